"""Judging a captioner on `shapes`: each caption parsed (``unclip.data.shapes.parse_caption``) and checked against
the metadata of the scene it describes, so a caption is right or wrong by the data set's own vocabulary.

Per scene kind (``<kind>/<check>``, fractions of that kind's captions):

* ``single``: ``colour``, ``shape`` (always named), ``size`` and ``position`` among the captions that name them
  (``size_named``, ``position_named``: how many do; a caption may leave them out, as the data's own captions do),
  ``all``: colour, shape and whatever size and position it names right;
* ``pair``: ``objects`` (the two colour-shape objects, in either order), ``relation`` (the objects stand as the
  caption says: "a red circle to the left of a blue square" and "a blue square to the right of a red circle" are
  both right), ``all`` (= relation);
* ``count``: ``count``, ``colour``, ``shape``, ``all``.

A caption that does not parse, or names another kind of scene (a pair for one object), is wrong on every check of
its scene's kind; ``unparseable`` (and ``<kind>/unparseable``) counts the first, ``scene`` the captions of the right
kind. ``all`` over every kind, and ``n``.
"""

from __future__ import annotations

from typing import Sequence

from unclip.data.shapes import parse_caption

CHECKS = {"single": ("colour", "shape", "size", "position", "all"), "pair": ("objects", "relation", "all"),
          "count": ("count", "colour", "shape", "all")}


def _single(said: dict, truth: dict) -> dict:
    got, want = said["objects"][0], truth["objects"][0]
    checks = {"colour": got["colour"] == want["colour"], "shape": got["shape"] == want["shape"]}
    if said.get("named_size"):
        checks["size"] = got["size"] == want["size"]
    if said.get("named_position"):
        checks["position"] = got["position"] == want["position"]
    checks["all"] = all(checks.values())
    return checks


def _pair(said: dict, truth: dict) -> dict:
    def key(obj: dict) -> tuple[str, str]:
        return obj["colour"], obj["shape"]

    objects = sorted(map(key, said["objects"])) == sorted(map(key, truth["objects"]))
    where = {key(obj): obj["position"] for obj in truth["objects"]}
    relation = objects and all(where[key(obj)] == obj["position"] for obj in said["objects"])
    return {"objects": objects, "relation": relation, "all": relation}


def _count(said: dict, truth: dict) -> dict:
    got, want = said["objects"][0], truth["objects"][0]
    checks = {"count": said["count"] == truth.get("count", len(truth["objects"])),
              "colour": got["colour"] == want["colour"], "shape": got["shape"] == want["shape"]}
    checks["all"] = all(checks.values())
    return checks


JUDGES = {"single": _single, "pair": _pair, "count": _count}


def judge_caption(caption: str, meta: dict) -> dict[str, bool]:
    """One caption against its scene's metadata: the checks of the scene's kind (see the module's docstring), plus
    ``parsed`` and ``scene`` (it describes a scene of that kind)."""
    kind = meta["scene"]
    said = parse_caption(caption)
    if said is None or said["scene"] != kind:
        wrong = {check: False for check in CHECKS[kind] if check not in ("size", "position")}
        return {**wrong, "parsed": said is not None, "scene": False}
    return {**JUDGES[kind](said, meta), "parsed": True, "scene": True}


def caption_scores(captions: Sequence[str], metas: Sequence[dict], prefix: str = "") -> dict[str, float]:
    """The judge's fractions over captions and their scenes' metadata (one caption per scene, in order):
    ``<prefix><kind>/<check>``, ``<prefix><kind>/size_named`` and ``.../position_named`` (singles),
    ``<prefix><kind>/unparseable``, ``<prefix><kind>/n``, and over every kind ``<prefix>all``,
    ``<prefix>scene``, ``<prefix>unparseable``, ``<prefix>n``."""
    if len(captions) != len(metas):
        raise ValueError(f"{len(captions)} captions for {len(metas)} scenes; give one caption per scene")
    if not captions:
        raise ValueError("no captions to judge; give at least one")
    judged = [judge_caption(caption, meta) for caption, meta in zip(captions, metas)]
    scores: dict[str, float] = {}
    for kind in CHECKS:
        mine = [j for j, meta in zip(judged, metas) if meta["scene"] == kind]
        if not mine:
            continue
        for check in CHECKS[kind]:
            named = [j[check] for j in mine if check in j]
            if named:
                scores[f"{prefix}{kind}/{check}"] = sum(named) / len(named)
            if check in ("size", "position"):
                scores[f"{prefix}{kind}/{check}_named"] = len(named) / len(mine)
        scores[f"{prefix}{kind}/unparseable"] = sum(not j["parsed"] for j in mine) / len(mine)
        scores[f"{prefix}{kind}/n"] = float(len(mine))
    scores[f"{prefix}all"] = sum(j["all"] for j in judged) / len(judged)
    scores[f"{prefix}scene"] = sum(j["scene"] for j in judged) / len(judged)
    scores[f"{prefix}unparseable"] = sum(not j["parsed"] for j in judged) / len(judged)
    scores[f"{prefix}n"] = float(len(judged))
    return scores


def unparseable(captions: Sequence[str]) -> list[str]:
    """The captions ``parse_caption`` cannot read (to show beside the scores)."""
    return [caption for caption in captions if parse_caption(caption) is None]


ROWS = (("single", "colour"), ("single", "shape"), ("single", "size"), ("single", "size_named"),
        ("single", "position"), ("single", "position_named"), ("single", "all"), ("pair", "objects"),
        ("pair", "relation"), ("count", "count"), ("count", "colour"), ("count", "shape"), ("count", "all"),
        (None, "unparseable"), (None, "n"))


def caption_table(scores: dict[str, dict[str, float]]) -> str:
    """A markdown table of ``{column: caption_scores(...)}``: one row per check, one column per split / setting."""
    columns = list(scores)
    lines = ["| check | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for kind, check in ROWS:
        key = f"{kind}/{check}" if kind else check
        cells = [scores[column].get(key) for column in columns]
        if all(cell is None for cell in cells):
            continue
        name = f"{kind} {check.replace('_', ' ')}" if kind else check
        lines.append(f"| {name} | " + " | ".join(
            "" if cell is None else f"{int(cell)}" if check == "n" else f"{100 * cell:.0f}%" for cell in cells) + " |")
    return "\n".join(lines)
