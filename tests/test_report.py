"""train/report.py: one self-contained HTML page per run (a stage's run or a demo's directory), or several side by
side, built from what the jobs write (metrics.json, log.jsonl and its curves, the grid, the fidelity table)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from unclip.images import save_grid
from unclip.jobs import Job
from unclip.report import read_run, write_report
from unclip.training.curves import LOG, plot_runs

ROOT = Path(__file__).resolve().parents[1]


def stage_run(run_dir: Path, fid: float, steps: int = 300) -> Path:
    """A finished stage run as a training job leaves it: log.jsonl with losses and an FID curve, curves.png, the
    Hydra config, metrics.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"trainer:\n  max_steps: {steps}\n  batch_size: 8\n  lr: 0.001\ndata:\n  image_size: 32\n")
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, steps, 50)]
    records += [{"step": s, "eval": {"fid_clip_g3_val": fid * 300 / s}} for s in (100, 200, 300)]
    (run_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_runs([run_dir], run_dir / "curves.png")
    Job(run_dir, {}).finish({"fid_clip_g3_val": fid, "minutes": 1.5, "step": steps})
    return run_dir


def demo_dir(out: Path, fid: float) -> Path:
    stage_run(out / "decoder", fid)
    stage_run(out / "prior", fid)
    save_grid([Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green", "white")], out / "grid.png", 2)
    (out / "fidelity.txt").write_text("balanced prompt set, text to image:\nsplit  colour\nval    100%\n")
    metrics = {"fidelity/val/colour": 1.0, "fidelity/val/all": 0.75, "fidelity/val/n": 8,
               "fidelity/val/position=top": 0.5, "distribution/fid_clip": fid, "distribution/fid_clip_floor": 0.1,
               "distribution/fid_clip_ceiling_noise": 9.0, "distribution/n_fid_clip": 8, "minutes": 4.0}
    Job(out, {}).finish(metrics)
    return out


def test_one_runs_page_shows_what_was_trained_its_curves_grid_and_metrics(tmp_path, capsys):
    out = demo_dir(tmp_path / "demo", fid=2.5)
    page = write_report([out])
    assert page == out / "report.html"
    text = page.read_text()
    assert text.count("<img") == 3 and "data:image/png;base64," in text  # the grid and the 2 stages' curves
    assert "decoder: training curves" in text and "prior: training curves" in text
    assert re.search(r"<td>decoder</td><td>300</td><td>8</td><td>0.001</td>", text)  # steps, batch, lr per stage
    assert "balanced prompt set, text to image" in text and "val/position=top" in text
    assert "distribution metrics" in text and "fid_clip_floor" in text and "fid_clip_ceiling_noise" in text
    assert "whole run (stages and evaluation): 4.0 minutes" in text
    assert "src='outputs" not in text and "file:" not in text  # self-contained: nothing linked


def test_two_runs_side_by_side_and_the_command_line(tmp_path):
    a, b = demo_dir(tmp_path / "long", fid=1.0), demo_dir(tmp_path / "short", fid=4.0)
    done = subprocess.run([sys.executable, "train/report.py", str(a), str(b)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip())
    assert page == tmp_path / "report-long-vs-short.html"
    text = page.read_text()
    assert "side by side" in text and re.search(r"<td>distribution/fid_clip</td><td>1</td><td>4</td>", text)
    assert "long: samples" in text and "short: samples" in text


def test_what_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_run(tmp_path / "missing")
    (tmp_path / "running").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metrics.json: the run has not finished"):
        read_run(tmp_path / "running")
    done = subprocess.run([sys.executable, "train/report.py", str(tmp_path / "running")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "has no metrics.json" in done.stderr
