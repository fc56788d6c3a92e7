"""bench/metrics.py: FID, KID, precision/recall of a saved pipeline over seeds and counts, with their seconds."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from stages import save_micro_pipeline

from unclip.pipelines import GenerationSettings, UnCLIPPipeline

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_bench_quick_reports_each_seed_and_the_spread(tmp_path):
    stages = save_micro_pipeline(tmp_path / "stages")
    settings = GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2)
    pipe = UnCLIPPipeline.from_pretrained(**stages, device="cpu")
    pipe.settings = settings
    pipe.save_pretrained(tmp_path / "pipeline")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/metrics.py", str(tmp_path / "pipeline"), "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(row["count"], row["seed"]) for row in report["rows"]] == [(12, 0), (12, 1)]
    first, second = report["rows"]
    assert first["n_fid_clip"] == 12 and first["generate_s"] > 0 and first["metrics_s"] > 0
    assert first["fid_clip_floor"] < first["fid_clip_ceiling_noise"]  # the calibration rows, once per count
    assert first["fid_clip"] != second["fid_clip"]  # the seeds sample differently
    assert report["summary"]["12"]["fid_std"] > 0
    bad = subprocess.run([sys.executable, "bench/metrics.py", str(tmp_path / "pipeline"), "--counts", "4"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--counts must be >= 9" in bad.stderr


def test_metrics_bench_smaller_counts_are_the_first_scenes_of_each_split_of_the_largest():
    spec = importlib.util.spec_from_file_location("bench_metrics", ROOT / "bench" / "metrics.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    largest = [scene.caption for scene in bench.scenes(45, 0)]
    for count in (9, 18, 45):
        nested = [scene.caption for scene in bench.scenes(count, 0, largest=45)]
        assert len(nested) == count and [largest[i] for i in bench.rows_of(count, 45)] == nested
        assert sum(bench.split_counts(count).values()) == count
    assert bench.split_counts(18) == {"val": 10, "heldout": 4, "pair": 4}
