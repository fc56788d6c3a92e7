"""Precomputed-embedding shards: what the prior trains on, without touching images.

A shard is one safetensors file holding, for N items of a data set encoded by one CLIP:

* ``image_embed`` [N, D] and ``text_embed`` [N, D]: unit-norm CLIP embeddings (float16);
* ``token_embeds`` [N, T, Dt] (float16) and ``mask`` [N, T] (bool): the per-token text states;
* ``tokens`` [N, T] (int32);

and as metadata the EmbeddingSpace (JSON), the captions and the items' metadata (JSON lists).

A folder of shards is written whole: :func:`write_embedding_shards` writes into a hidden folder beside it and
swaps it in at the end, so a re-run replaces every old shard (never mixes old and new ones) and an interrupted
run leaves the old shards as they were. A folder holding anything but shards is refused, not replaced.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from unclip.embedding import EmbeddingSpace, TextCondition
from unclip.weights import CheckpointError

FORMAT = "unclip-embeddings/1"
TENSORS = ("image_embed", "text_embed", "token_embeds", "mask", "tokens")
SHARD_NAME = re.compile(r"\.?shard-\d{5}\.safetensors(\.tmp)?")  # a shard, or one being written


def _check_only_shards(folder: Path) -> None:
    """FileExistsError unless ``folder`` is absent or a real folder holding embedding shards only."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FileExistsError(f"{folder} is not a folder of embedding shards (a file or a link); embedding shards "
                              "are written to a folder of their own: move it, or write them elsewhere")
    if not folder.is_dir():
        return
    foreign = sorted(path.name for path in folder.iterdir() if not SHARD_NAME.fullmatch(path.name))
    if foreign:
        raise FileExistsError(
            f"{folder} holds {len(foreign)} files that are not embedding shards ({', '.join(foreign[:5])}); writing "
            "shards replaces the folder and would delete them: move them, or write the shards elsewhere")


def remove_embedding_shards(*folders: str | Path) -> list[Path]:
    """Delete folders of embedding shards, each checked first (none deleted if one holds anything else); those
    that were there."""
    paths = [Path(folder) for folder in folders]
    for folder in paths:
        _check_only_shards(folder)
    removed = [folder for folder in paths if folder.exists()]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


@torch.no_grad()
def write_embedding_shards(
    out_dir: str | Path,
    encoder,
    dataset: Dataset,
    *,
    collate_fn,
    shard_size: int = 8192,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "embed",
) -> list[Path]:
    """Encode every item of ``dataset`` (dicts with "image", "caption", "meta") into shards in ``out_dir``.

    ``out_dir`` ends up holding this call's shards and nothing else: they are written to a hidden folder
    beside it, which replaces ``out_dir`` when all are written (see module). Returns the shards' paths.
    """
    out = Path(out_dir)
    staging = _staging(out)
    space = encoder.space
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=False)
    paths: list[Path] = []
    pending: dict[str, list] = {name: [] for name in (*TENSORS, "caption", "meta")}

    def flush() -> None:
        if not pending["caption"]:
            return
        with torch.autocast("cpu", enabled=False):  # the pending tensors live on the CPU
            tensors = {name: torch.cat(pending[name]).contiguous() for name in TENSORS}
        paths.append(_save_shard(staging / f"shard-{len(paths):05d}.safetensors", tensors, space, pending["caption"],
                                 pending["meta"]))
        for values in pending.values():
            values.clear()

    for batch in tqdm(loader, desc=desc, disable=not progress):
        cond = encoder.encode_text(batch["caption"])
        pending["image_embed"].append(encoder.encode_image(batch["image"]).half().cpu())
        pending["text_embed"].append(cond.embed.half().cpu())
        pending["token_embeds"].append(cond.token_embeds.half().cpu())
        pending["mask"].append(cond.mask.cpu())
        pending["tokens"].append(cond.tokens.int().cpu())
        pending["caption"].extend(batch["caption"])
        pending["meta"].extend(batch.get("meta", [None] * len(batch["caption"])))
        if len(pending["caption"]) >= shard_size:
            flush()
    flush()
    _swap_in(staging, out)
    return [out / path.name for path in paths]


def _staging(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` to write its new shards into (leftovers of a killed run removed)."""
    _check_only_shards(out)
    for leftover in (out.with_name(f".{out.name}.writing"), out.with_name(f".{out.name}.old")):
        remove_embedding_shards(leftover)
    staging = out.with_name(f".{out.name}.writing")
    staging.mkdir(parents=True)
    return staging


def _save_shard(path: Path, tensors: dict, space: EmbeddingSpace, captions: list, metas: list) -> Path:
    metadata = {"format": FORMAT, "space": json.dumps(space.to_dict()), "captions": json.dumps(captions),
                "metas": json.dumps(metas)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _swap_in(staging: Path, out: Path) -> None:
    """``staging``'s shards become ``out``: the old shards go only once every new one is written."""
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        out.rename(old)
    staging.rename(out)
    remove_embedding_shards(old)


def clip_scores(shards: EmbeddingShards) -> torch.Tensor:
    """Each pair's image-text cosine under the CLIP that encoded it (the embeddings are unit-norm): LAION's
    CLIP score."""
    return (shards.tensors["image_embed"].float() * shards.tensors["text_embed"].float()).sum(-1)


def check_filter(min_clip_score: float | None, drop_fraction: float) -> None:
    """ValueError naming a bad CLIP-score filter setting (train/embed.py's ``filter``)."""
    if min_clip_score is not None and (isinstance(min_clip_score, bool) or not isinstance(min_clip_score, (int, float))
                                       or not -1 <= min_clip_score <= 1):
        raise ValueError(f"filter.min_clip_score must be a cosine in [-1, 1] or null (no threshold), got "
                         f"{min_clip_score!r}")
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 <= drop_fraction < 1:
        raise ValueError(f"filter.drop_fraction must be in [0, 1) (the share of training pairs with the lowest CLIP "
                         f"score dropped), got {drop_fraction!r}")


def filter_embedding_shards(folder: str | Path, *, min_clip_score: float | None = None, drop_fraction: float = 0.0,
                            shard_size: int = 8192) -> dict:
    """Drop the pairs of a folder of shards whose CLIP score (:func:`clip_scores`) is below ``min_clip_score`` or
    among the lowest ``drop_fraction`` of them, rewriting the folder (whole, as :func:`write_embedding_shards`
    does). Returns what was dropped: ``filter_kept``, ``filter_dropped``, ``filter_threshold`` (the lowest kept
    score) and, where the items' meta says which captions were garbage (``caption_noised``, data.caption_noise),
    ``filter_noised`` (garbage pairs before), ``filter_dropped_noised`` and the mean scores of clean and garbage
    pairs."""
    check_filter(min_clip_score, drop_fraction)
    out = Path(folder)
    shards = EmbeddingShards(out)
    scores = clip_scores(shards)
    keep = torch.ones(len(scores), dtype=torch.bool)
    if min_clip_score is not None:
        keep &= scores >= min_clip_score
    dropped_lowest = int(len(scores) * drop_fraction)
    if dropped_lowest:
        keep[scores.argsort(stable=True)[:dropped_lowest]] = False
    if not keep.any():
        raise ValueError(f"the filter (min_clip_score={min_clip_score}, drop_fraction={drop_fraction}) drops all "
                         f"{len(scores)} pairs of {out} (CLIP scores {scores.min():.3f} to {scores.max():.3f}); "
                         "lower min_clip_score")
    _rewrite(out, shards, keep.nonzero().squeeze(1), shard_size)
    return _filter_report(shards.metas, scores, keep)


def _rewrite(out: Path, shards: EmbeddingShards, kept: torch.Tensor, shard_size: int) -> None:
    staging = _staging(out)
    for number, start in enumerate(range(0, len(kept), shard_size)):
        index = kept[start : start + shard_size]
        tensors = {name: shards.tensors[name][index].contiguous() for name in TENSORS}
        _save_shard(staging / f"shard-{number:05d}.safetensors", tensors, shards.space,
                    [shards.captions[i] for i in index.tolist()], [shards.metas[i] for i in index.tolist()])
    _swap_in(staging, out)


def _filter_report(metas: list, scores: torch.Tensor, keep: torch.Tensor) -> dict:
    report = {"filter_kept": int(keep.sum()), "filter_dropped": int((~keep).sum()),
              "filter_threshold": float(scores[keep].min())}
    if not any(isinstance(meta, dict) and "caption_noised" in meta for meta in metas):
        return report  # the source does not say which captions are garbage
    noised = torch.tensor([bool(isinstance(meta, dict) and meta.get("caption_noised")) for meta in metas])
    report.update(filter_noised=int(noised.sum()), filter_dropped_noised=int((noised & ~keep).sum()),
                  filter_kept_noised=int((noised & keep).sum()),
                  clip_score_clean=float(scores[~noised].mean()) if (~noised).any() else None,
                  clip_score_noised=float(scores[noised].mean()) if noised.any() else None)
    return report


def _shard_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"embedding shards {path} do not exist")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no embedding shards (*.safetensors)")
    return files


class EmbeddingShards(Dataset):
    """All shards of a directory, in memory. Items: {"image_embed", "text_embed", "token_embeds", "mask", "caption", "meta"}."""

    def __init__(self, path: str | Path | Iterable[str | Path], expected_space: EmbeddingSpace | None = None):
        files = [f for p in ([path] if isinstance(path, (str, Path)) else path) for f in _shard_files(p)]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
        self.captions: list[str] = []
        self.metas: list = []
        self.space: EmbeddingSpace | None = None
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as shard:
                    metadata = shard.metadata() or {}
                    if metadata.get("format") != FORMAT:
                        raise CheckpointError(f"{file} is not an embedding shard (format {metadata.get('format')!r}, expected {FORMAT!r})")
                    space = EmbeddingSpace.from_dict(json.loads(metadata["space"]))
                    tensors = {name: shard.get_tensor(name) for name in TENSORS}
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"embedding shard {file} is damaged: {type(err).__name__}: {err}") from err
            if self.space is None:
                self.space = space
            else:
                self.space.check_same(space, f"shard {files[0]}", f"shard {file}")
            _check_shapes(file, tensors, space)
            for name in TENSORS:
                parts[name].append(tensors[name])
            self.captions.extend(json.loads(metadata["captions"]))
            self.metas.extend(json.loads(metadata["metas"]))
        if expected_space is not None:
            expected_space.check_same(self.space, "the CLIP named in the config", f"the embedding shards in {path}")
        self.tensors = {name: torch.cat(values) for name, values in parts.items()}
        if len(self.captions) != len(self.tensors["image_embed"]):
            raise CheckpointError(f"{path}: {len(self.captions)} captions for {len(self.tensors['image_embed'])} embeddings")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        item = {
            "image_embed": self.tensors["image_embed"][i].float(),
            "text_embed": self.tensors["text_embed"][i].float(),
            "token_embeds": self.tensors["token_embeds"][i].float(),
            "mask": self.tensors["mask"][i],
            "tokens": self.tensors["tokens"][i].long(),
            "caption": self.captions[i],
            "meta": self.metas[i],
        }
        return item

    def text_condition(self, indices=None) -> TextCondition:
        """The text side of items (all, or ``indices``) as a TextCondition."""
        index = slice(None) if indices is None else indices
        return TextCondition(
            embed=self.tensors["text_embed"][index].float(),
            tokens=self.tensors["tokens"][index].long(),
            token_embeds=self.tensors["token_embeds"][index].float(),
            mask=self.tensors["mask"][index],
        )


def _check_shapes(file: Path, tensors: dict, space: EmbeddingSpace) -> None:
    n = tensors["image_embed"].shape[0]
    expected = {
        "image_embed": (n, space.dim),
        "text_embed": (n, space.dim),
        "token_embeds": (n, space.text_length, space.token_dim),
        "mask": (n, space.text_length),
        "tokens": (n, space.text_length),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"embedding shard {file}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"for the embedding space {space.describe()}"
            )
