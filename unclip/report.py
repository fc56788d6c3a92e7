"""One self-contained HTML page per run (``python train/report.py RUN``), or one comparing several side by side.

A run is a stage's run directory (train/<stage>.py: metrics.json, curves.png, .hydra/config.yaml) or a demo's
directory (train/demo.py: metrics.json, grid.png, fidelity.txt and a run directory per stage). The page shows what
was trained (the headline settings, the minutes of each stage, the whole config folded), the training curves, the
sample grid, and the metrics: for `shapes` the balanced prompt set per attribute and per attribute value, for any
data the distribution metrics (FID/KID/precision/recall in their feature space, beside their calibration rows) and
the CLIP scores; every other number folded below. Images are embedded (base64), so the page is one file to share.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "report.html"
HEADLINE_SETTINGS = ("trainer.max_steps", "trainer.batch_size", "trainer.lr", "trainer.mixed_precision", "data.name",
                     "data.image_size", "trainer.seed")
FIDELITY_COLUMNS = ("colour", "shape", "size", "position", "objects", "relation", "count", "all", "n")
DISTRIBUTION = re.compile(r"(^|/)(fid|kid|precision|recall|n_fid)_[a-z_]+$|(^|/)clip_score$")


@dataclass
class Run:
    """What a report reads of one run directory."""

    path: Path
    metrics: dict
    config: dict = field(default_factory=dict)  # flattened: "trainer.lr" -> 0.001
    stages: dict[str, "Run"] = field(default_factory=dict)  # a demo's stage runs, by name

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def images(self) -> list[tuple[str, Path]]:
        """(title, PNG) to show: the sample grid and the curves, the demo's stages' curves after its own."""
        shown = [(title, self.path / file) for title, file in (("samples", "grid.png"), ("training curves", "curves.png"))]
        shown += [(f"{name}: training curves", stage.path / "curves.png") for name, stage in self.stages.items()]
        return [(title, path) for title, path in shown if path.is_file()]


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _read_config(run_dir: Path) -> dict:
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if not hydra_config.is_file():
        return {}
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=False))


def read_run(path: str | Path) -> Run:
    """A run directory (or a demo's directory: its stages are the subdirectories with a metrics.json)."""
    path = Path(path)
    metrics_file = path / "metrics.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run directory (no such directory); give a train/<stage>.py run "
                                "directory or a demo's output directory (e.g. outputs/demo)")
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{path} has no metrics.json: the run has not finished (or this is not a run "
                                "directory); a report needs a finished run")
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{metrics_file} is damaged, not JSON ({err})") from err
    stages = {child.name: read_run(child) for child in sorted(path.iterdir())
              if child.is_dir() and not child.is_symlink() and (child / "metrics.json").is_file()}
    return Run(path=path, metrics=metrics, config=_read_config(path), stages=stages)


# -- HTML pieces ----------------------------------------------------------------------------------
def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _trained(run: Run) -> str:
    """The headline settings and minutes: one row per stage for a demo, one row for a stage run."""
    runs = run.stages or {run.name: run}
    settings = [key for key in HEADLINE_SETTINGS if any(key in stage.config for stage in runs.values())]
    rows = [[name, *(stage.config.get(key, "") for key in settings), stage.metrics.get("minutes", "")]
            for name, stage in runs.items()]
    total = run.metrics.get("minutes")
    text = _table(["stage", *settings, "minutes"], rows)
    if run.stages and isinstance(total, (int, float)):
        text += f"<p>whole run (stages and evaluation): {total:.1f} minutes</p>"
    folded = "".join(f"<h4>{html.escape(name)}</h4><pre>{html.escape(json.dumps(stage.config, indent=1))}</pre>"
                     for name, stage in runs.items() if stage.config)
    return text + (f"<details><summary>every setting</summary>{folded}</details>" if folded else "")


def _share(value, column: str = "") -> str:
    """A judged share as a percentage (counts as they are)."""
    return f"{value:.0%}" if isinstance(value, float) and column != "n" else value


def fidelity_tables(metrics: dict) -> str:
    """The balanced prompt set (``fidelity/<split>/<attribute>``, ``fidelity_variations/...``) per attribute, then
    per attribute value (``fidelity/val/position=top``)."""
    parts = []
    for prefix, title in (("fidelity/", "text to image"), ("fidelity_variations/", "decoded true embeddings")):
        splits = sorted({key.split("/")[1] for key in metrics if key.startswith(prefix) and key.count("/") == 2})
        if not splits:
            continue
        rows = [[split, *(_share(metrics.get(f"{prefix}{split}/{column}", ""), column) for column in FIDELITY_COLUMNS)]
                for split in splits]
        values = sorted((key[len(prefix):], _share(value)) for key, value in metrics.items()
                        if key.startswith(prefix) and "=" in key)
        parts.append(f"<h3>balanced prompt set, {title}</h3>" + _table(["split", *FIDELITY_COLUMNS], rows))
        if values:
            parts.append(f"<details open><summary>per attribute value</summary>"
                         f"{_table(['split/attribute=value', 'right'], [list(v) for v in values])}</details>")
    return "".join(parts)


FID_KEY = re.compile(r"^(?P<prefix>(?:.*/)?)fid_(?P<space>[a-z]+)(?P<suffix>(?:_g[^/]*)?)$")


def distribution_table(metrics: dict) -> str:
    """One table per FID found (``distribution/fid_clip``, ``distribution/val/fid_clip``, a decoder's
    ``fid_clip_g3_val``): the generated images' FID, KID, precision, recall and count, then the calibration rows
    (floor, ceilings) where the run has them, and the CLIP score."""
    found = _numbers(metrics)
    tables = []
    for key in sorted(found):
        match = FID_KEY.match(key)
        if not match:
            continue
        prefix, space, suffix = match["prefix"], match["space"], match["suffix"]

        def get(name, default=""):
            return found.get(f"{prefix}{name}{suffix}", default)

        rows = [["generated", found[key], _pm(get(f"kid_{space}_mean", None), get(f"kid_{space}_std", None)),
                 get(f"precision_{space}"), get(f"recall_{space}"), get(f"n_fid_{space}")]]
        rows += [[title, found[f"{prefix}fid_{space}_{name}"], "", "", "", found.get(f"{prefix}n_fid_{space}_calibration", "")]
                 for name, title in (("floor", "floor: real vs real"), ("ceiling_mean", "ceiling: the mean image"),
                                     ("ceiling_noise", "ceiling: noise")) if f"{prefix}fid_{space}_{name}" in found]
        clip = found.get(f"{prefix}clip_score")
        tables.append(f"<h4>{html.escape(key)}</h4>" + _table(["images", f"FID ({space})", "KID", "precision",
                                                               "recall", "n"], rows)
                      + (f"<p>CLIP score (mean cosine to the prompts): {clip:.4g}</p>" if clip is not None else ""))
    return ("<h3>distribution metrics</h3><p>FID is biased by the sample count (n): compare at equal counts. A good "
            "run's FID lies near the floor (real against real) and far below the ceilings (trivial generators).</p>"
            + "".join(tables)) if tables else ""


def _pm(mean, std) -> str:
    return "" if mean is None else f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"



def _run_section(run: Run) -> str:
    numbers = _numbers(run.metrics)
    parts = [f"<h2>{html.escape(str(run.path))}</h2>", "<h3>what was trained</h3>", _trained(run)]
    parts += [_image(path, title) for title, path in run.images]
    fidelity = run.path / "fidelity.txt"
    if fidelity.is_file():
        parts.append(f"<h3>summary</h3><pre>{html.escape(fidelity.read_text())}</pre>")
    parts += [fidelity_tables(numbers), distribution_table(numbers)]
    parts.append("<details><summary>every metric</summary>"
                 + _table(["metric", "value"], [[k, v] for k, v in sorted(numbers.items())]) + "</details>")
    return "<section>" + "".join(parts) + "</section>"


def _comparison(runs: list[Run]) -> str:
    """Side by side: every number any run has, a column per run (headline ones first)."""
    keys = sorted(set().union(*(_numbers(run.metrics) for run in runs)))
    headline = [k for k in keys if k.startswith("fidelity/") and k.count("/") == 2 or DISTRIBUTION.search(k)
                or k.startswith("geneval/") or k == "minutes"]
    rest = [k for k in keys if k not in headline]
    header = ["metric", *(run.name for run in runs)]
    grids = "".join(f"<div class='side'>{_image(path, f'{run.name}: {title}')}</div>"
                    for run in runs for title, path in run.images if title == "samples")
    return ("<section><h2>side by side</h2>" + _table(header, [[k, *(run.metrics.get(k, "") for run in runs)]
                                                            for k in headline])
            + f"<div class='row'>{grids}</div><details><summary>every other number</summary>"
            + _table(header, [[k, *(run.metrics.get(k, "") for run in runs)] for k in rest]) + "</details></section>")


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}
img{image-rendering:pixelated;max-width:100%;min-width:256px}figure{display:inline-block;margin:.5em}.row{display:flex;gap:1em}
section{border-top:2px solid #888;margin-top:1.5em}pre{background:#f4f4f4;padding:.5em}"""


def render(runs: list[Run]) -> str:
    title = "unclip report: " + " vs ".join(run.name for run in runs)
    body = (_comparison(runs) if len(runs) > 1 else "") + "".join(_run_section(run) for run in runs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def write_report(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of one run (default: ``RUN/report.html``) or of several side by side (default:
    ``report-<a>-vs-<b>.html`` beside the first); returns its path."""
    if not paths:
        raise ValueError("give at least one run directory")
    runs = [read_run(path) for path in paths]
    if out is None:
        first = runs[0].path
        out = first / REPORT_FILE if len(runs) == 1 else first.parent / (
            "report-" + "-vs-".join(run.name for run in runs) + ".html")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(runs))
    tmp.replace(out)
    return out
