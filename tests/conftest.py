"""Shared fixtures: tiny real components built in seconds on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The jobs the tests start (train/*.py, bench/*.py) train tiny models too: one thread each, like this process
# (`_one_thread`); two threads made test_jobs.py's decoder job 2x slower on the busy 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "train"))
import _job  # noqa: E402,F401  registers the structured configs conf/ names (trainer/schema, generation/defaults)

MICRO_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def micro_clip():
    from unclip.clip import OpenClipEncoder

    torch.manual_seed(0)
    return OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU; without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); bench/gpu.sh runs them")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
