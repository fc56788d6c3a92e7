"""Tiny real stages for tests: a micro CLIP, prior, decoder and upsampler saved as checkpoints, and the tiny
training runs that the data-parallel tests compare (``fit_tiny``, ``on_each_process``, ``final_weights``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import MICRO_CLIP, ROOT
from safetensors.torch import load_file

from unclip.checkpoint import save_stage
from unclip.clip import OpenClipEncoder
from unclip.decoder import Decoder, Upsampler
from unclip.prior import DiffusionPrior
from unclip.training import Trainer, TrainerConfig

TINY_UNET = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8], "head_channels": 16}


def micro_stages(seed: int = 0):
    torch.manual_seed(seed)
    clip = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")
    space = clip.space
    prior = DiffusionPrior(embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length,
                           net=dict(width=32, depth=1, heads=2), num_steps=50)
    decoder = Decoder(image_size=16, image_embed_dim=space.dim, text_length=space.text_length, unet=TINY_UNET,
                      caption_width=32, caption_layers=1, caption_heads=2, num_steps=50)
    upsampler = Upsampler(low_res_size=16, image_size=32, unet=TINY_UNET, num_steps=50)
    return clip, prior, decoder, upsampler


@torch.no_grad()
def enliven(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Fill every all-zero parameter (the zero-initialised output layers) with small random values, so that a
    fresh model's output depends on its input and conditioning: tests that pin outputs then see every path."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.numel() and not param.any():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def save_micro_pipeline(root, seed: int = 0, *, lively: bool = False):
    """The micro stages saved under ``root`` as a pipeline spec's paths; ``lively``: every stage enlivened (see
    ``enliven``)."""
    stages = micro_stages(seed)
    clip, prior, decoder, upsampler = (enliven(m, seed + i) for i, m in enumerate(stages)) if lively else stages
    space = clip.space
    return {
        "clip": save_stage(root / "clip", clip, stage="clip", space=space),
        "prior": save_stage(root / "prior", prior, stage="prior", space=space),
        "decoder": save_stage(root / "decoder", decoder, stage="decoder", space=space),
        "upsamplers": [save_stage(root / "upsampler", upsampler, stage="upsampler", space=None)],
    }


def save_lively_pipeline(root, seed: int = 0):
    """``save_micro_pipeline`` with every stage enlivened."""
    return save_micro_pipeline(root, seed, lively=True)


def fit_tiny(model, loss_fn, dataset, run_dir, *, stage: str, steps: int, batch_size: int, lr: float,
             collate_fn=None, after_step_fn=None) -> None:
    """Train ``model`` for ``steps`` steps with the real Trainer: full precision, seed 0, an EMA of beta 0.5
    from the first step, no checkpoints but the final one."""
    config = TrainerConfig(
        max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=1, mixed_precision="no", ema_beta=0.5,
        ema_update_after_step=0, checkpoint_every=0, log_every=1, progress=False, seed=0,
    )
    Trainer(model, loss_fn, dataset, config, run_dir, stage=stage, space_fn=lambda m: None, collate_fn=collate_fn,
            after_step_fn=after_step_fn).fit()


def on_each_process(fn, *args) -> None:
    """``fn(*args)`` in every process that ``accelerate.debug_launcher`` forks: pass this (and a module-level
    ``fn``) to debug_launcher, as ``debug_launcher(on_each_process, args=(fn, *args), num_processes=2)``."""
    # A fork inherits accelerate's singletons from the test process (set there by earlier one-process runs).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    fn(*args)


def final_weights(run_dir, steps: int):
    """(model weights, EMA weights, number of processes) of a run's checkpoint at ``steps``."""
    checkpoint = run_dir / "checkpoints" / f"step-{steps:08d}"
    processes = json.loads((checkpoint / "trainer.json").read_text())["num_processes"]
    return load_file(checkpoint / "model.safetensors"), load_file(checkpoint / "ema.safetensors"), processes


def run_job(cmd: list[str], run_dir, *extra, wait: bool = True, timeout: int = 900):
    """``python *cmd hydra.run.dir=run_dir *extra`` from the repository root on one thread: its output (asserting
    it succeeded), or with ``wait=False`` the running process (stdout and stderr together)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *cmd, f"hydra.run.dir={run_dir}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]
        return out
    return proc


def kill_after_step(proc, run_dir, step: int, final_step: int, within: float = 600) -> None:
    """SIGKILL a running job once its latest checkpoint reaches ``step`` (waiting at most ``within`` seconds);
    asserts it had not finished."""
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + within
    while time.time() < deadline and proc.poll() is None and not (latest.exists()
                                                                   and latest.read_text() >= f"step-{step:08d}"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() < f"step-{final_step:08d}", "the run ended before it could be killed"
