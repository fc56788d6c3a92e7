"""train/embed.py and its shards: a re-run replaces the old shards, never mixes them with new ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from unclip.checkpoint import save_stage
from unclip.data.embeddings import EmbeddingShards, write_embedding_shards
from unclip.data.shapes import ShapesDataset, collate


def _write(out, clip, length: int, **kwargs):
    dataset = ShapesDataset(split="val", length=length, image_size=32, **kwargs)
    return write_embedding_shards(out, clip, dataset, collate_fn=collate, shard_size=8, batch_size=8, progress=False)


def test_writing_shards_again_replaces_the_old_ones(micro_clip, tmp_path):
    out = tmp_path / "val"
    assert len(_write(out, micro_clip, 24)) == 3
    paths = _write(out, micro_clip, 8, seed=1)  # 300 items were reported after a 100-item run
    assert paths == [out / "shard-00000.safetensors"] and sorted(p.name for p in out.iterdir()) == [paths[0].name]
    shards = EmbeddingShards(out)
    assert len(shards) == 8 and shards.captions == [item["caption"] for item in ShapesDataset(
        split="val", length=8, image_size=32, seed=1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # no folder left beside it


class Breaks(torch.utils.data.Dataset):
    """Shapes items, then an error: a run stopped midway."""

    def __init__(self, length: int, breaks_at: int):
        self.items, self.breaks_at = ShapesDataset(split="val", length=length, image_size=32, seed=2), breaks_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.breaks_at:
            raise KeyboardInterrupt("stopped")
        return self.items[i]


def test_a_write_stopped_midway_leaves_the_old_shards_whole(micro_clip, tmp_path):
    out = tmp_path / "train"
    _write(out, micro_clip, 20)
    with pytest.raises(KeyboardInterrupt):
        write_embedding_shards(out, micro_clip, Breaks(24, 17), collate_fn=collate, shard_size=8, batch_size=8,
                               progress=False)
    old = [item["caption"] for item in ShapesDataset(split="val", length=20, image_size=32)]
    assert EmbeddingShards(out).captions == old  # the old set, none of the new shards written before the stop
    assert len(_write(out, micro_clip, 9)) == 2 and len(EmbeddingShards(out)) == 9  # the next run cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_shards_are_not_written_over_other_files(micro_clip, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine holds 1 files that are not embedding shards \(thesis.tex\); "
                                              r"writing shards replaces the folder and would delete them"):
        _write(out, micro_clip, 8)
    assert (out / "thesis.tex").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    os.symlink(out, tmp_path / "link")
    with pytest.raises(FileExistsError, match="link is not a folder of embedding shards"):
        _write(tmp_path / "link", micro_clip, 8)


def _embed(run, clip, *overrides) -> dict:
    proc = subprocess.run(
        [sys.executable, "train/embed.py", f"hydra.run.dir={run}", f"clip_checkpoint={clip}", "data.image_size=32",
         "batch_size=8", "shard_size=8", "bf16=false", *overrides],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_embed_run_again_into_its_directory_reports_and_keeps_only_the_new_items(micro_clip, tmp_path):
    clip = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    run = tmp_path / "embed"
    first = _embed(run, clip, "splits.train=24", "splits.val=16", "splits.heldout=8")
    assert (first["items_train"], first["items_val"], first["items_heldout"]) == (24, 16, 8)
    again = _embed(run, clip, "splits.train=8", "splits.val=8", "splits.heldout=8")
    assert (again["items_train"], again["items_val"], again["items_heldout"]) == (8, 8, 8)
    assert len(EmbeddingShards(run / "train")) == 8 and len(EmbeddingShards(run / "val")) == 8  # what the prior reads
    # a bad bf16 is refused before any work: the last run's shards and metrics stay
    proc = subprocess.run([sys.executable, "train/embed.py", f"hydra.run.dir={run}", f"clip_checkpoint={clip}",
                           "data.image_size=32", "bf16=maybe"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "bf16 must be true, false or auto, got 'maybe'" in proc.stderr
    assert (run / "metrics.json").exists() and len(EmbeddingShards(run / "train")) == 8
    # a re-run that fails once started leaves neither old shards nor a metrics.json saying the stage is done
    proc = subprocess.run([sys.executable, "train/embed.py", f"hydra.run.dir={run}", f"clip_checkpoint={clip}",
                           "data.image_size=32", "batch_size=0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "batch_size" in proc.stderr
    assert not (run / "metrics.json").exists() and not (run / "train").exists() and not (run / "val").exists()
    # a data set without a heldout split: the old heldout shards (of other data) go too
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"red {i}")
    third = _embed(run, clip, "data=folder", f"data.root={folder}", "data.val_fraction=0.3")
    assert "items_heldout" not in third and not (run / "heldout").exists()
    assert third["items_train"] + third["items_val"] == 12
    assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name != ".hydra") == ["train", "val"]
