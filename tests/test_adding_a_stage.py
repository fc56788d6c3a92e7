"""docs/adding-a-stage.md is true: its toy stage (model, loss, job, config), copied out of the page into a project
of its own, trains 2 steps with the job helper and leaves a complete run directory."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def _page_blocks(language: str) -> str:
    page = (ROOT / "docs" / "adding-a-stage.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", page, re.S)
    assert len(blocks) == 1, f"docs/adding-a-stage.md should show one {language} block"
    return blocks[0]


def test_the_readme_toy_stage_trains_with_the_job_helper(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "train" / "toy.py").write_text(_page_blocks("python"))
    (tmp_path / "conf" / "train_toy.yaml").write_text(_page_blocks("yaml"))
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "train"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "train" / "toy.py"), f"hydra.run.dir={run}", f"hydra.searchpath=[file://{ROOT}/conf]",
         "trainer.max_steps=2", "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.progress=false",
         "data.image_size=16", "data.val.length=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 2 and metrics["val_loss"] >= 0
    assert metrics == json.loads((run / "metrics.json").read_text())
    saved = json.loads((run / "checkpoints" / "step-00000002" / "config.json").read_text())
    assert saved["stage"] == "toy"
    assert saved["model"] == {"_target_": "__main__.MeanColour", "image_size": 16, "hidden": 64}
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    assert (run / "curves.png").is_file() and (run / "log.jsonl").is_file()
