"""Checkpoints survive a SIGKILL at any point of a save, and damaged ones fail with a clear error.

A subprocess trains a tiny prior whose second checkpoint save pauses at a known point (a monkeypatch
inside the subprocess); the test kills it with SIGKILL during the pause. The previous checkpoint must
still load, ``latest`` must still name it, and a resumed run must continue from it to the same weights
as a run that was never interrupted. Also: damaged checkpoints, and an fp16 overflow (the non-finite
losses of one process are tests/test_training.py's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from unclip.checkpoint import load_stage
from unclip.data.collate import collate_dicts
from unclip.prior import DiffusionPrior
from unclip.training import Trainer, TrainerConfig
from unclip.weights import CheckpointError

TESTS = Path(__file__).resolve().parent
EMBED_DIM, TOKEN_DIM, TEXT_LENGTH = 8, 8, 4
FIRST, SECOND, LAST = "step-00000004", "step-00000008", "step-00000012"


class Embeddings(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        return {
            "image_embed": torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
            "text_embed": torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
            "token_embeds": torch.randn(TEXT_LENGTH, TOKEN_DIM, generator=g),
            "mask": torch.ones(TEXT_LENGTH, dtype=torch.bool),
        }


def prior_loss(model, batch):
    return model.training_loss(batch)  # timesteps, noise and dropout from the global RNG (restored on resume)


def make_trainer(run_dir, loss_fn=prior_loss, trainer_kwargs=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = DiffusionPrior(embed_dim=EMBED_DIM, token_dim=TOKEN_DIM, text_length=TEXT_LENGTH,
                           net=dict(width=16, depth=1, heads=2), num_steps=20)
    settings = dict(max_steps=12, batch_size=8, lr=1e-3, warmup_steps=2, mixed_precision="no", ema_beta=0.9,
                    ema_update_after_step=2, checkpoint_every=4, log_every=4, progress=False)
    settings.update(overrides)
    return Trainer(model, loss_fn, Embeddings(), TrainerConfig(**settings), run_dir, stage="prior",
                   space_fn=lambda m: None, collate_fn=collate_dicts, **(trainer_kwargs or {}))


# -- the subprocess ----------------------------------------------------------------------------------
def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    time.sleep(300)  # killed long before this ends


def install_pause(point: str, marker: Path) -> None:
    """Make the save of SECOND pause at ``point`` (runs inside the subprocess)."""
    import accelerate

    import unclip.checkpoint
    import unclip.training.trainer

    if point == "weights":  # model.safetensors half written
        save_model = unclip.checkpoint.save_model

        def half_written(model, filename, *args, **kwargs):
            save_model(model, filename, *args, **kwargs)
            if SECOND in filename and filename.endswith("model.safetensors"):
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                _pause(marker)

        unclip.checkpoint.save_model = half_written
    elif point == "trainer_state":  # accelerate writing the optimizer and RNG states
        save_state = accelerate.Accelerator.save_state

        def slow_save_state(self, output_dir=None, *args, **kwargs):
            if SECOND in str(output_dir):
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                (Path(output_dir) / "optimizer.bin").write_bytes(b"\x80\x02partial")
                _pause(marker)
            return save_state(self, output_dir, *args, **kwargs)

        accelerate.Accelerator.save_state = slow_save_state
    elif point == "commit":  # the directory is in place, `latest` not yet updated
        commit = unclip.training.trainer.commit_directory

        def commit_then_pause(tmp, final):
            commit(tmp, final)
            if final.name == SECOND:
                _pause(marker)

        unclip.training.trainer.commit_directory = commit_then_pause
    else:
        raise ValueError(point)


SCRIPT = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import torch
torch.set_num_threads(1)
import test_crash_safety as t
run_dir, point = Path(sys.argv[1]), sys.argv[2]
t.install_pause(point, run_dir.parent / "paused")
t.make_trainer(run_dir).fit()
"""


def train_and_kill_during_second_save(run_dir: Path, point: str) -> None:
    marker = run_dir.parent / "paused"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(run_dir), point], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess ended before the pause:\n{proc.stdout.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("the training subprocess did not reach the pause within 120 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The final weights of a run that was never interrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    make_trainer(run_dir).fit()
    return {name: load_file(run_dir / "checkpoints" / LAST / name) for name in ("model.safetensors", "ema.safetensors")}


@pytest.mark.parametrize("point", ["weights", "trainer_state", "commit"])
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_finishes(point, tmp_path, straight_run,
                                                                                 capsys):
    run_dir = tmp_path / "run"
    train_and_kill_during_second_save(run_dir, point)
    checkpoints = run_dir / "checkpoints"
    # killed mid-save: the partial save is where the pause left it
    partial = checkpoints / (SECOND if point == "commit" else f".tmp-{SECOND}")
    assert partial.is_dir()
    assert (checkpoints / "latest").read_text() == FIRST
    loaded = load_stage(run_dir, stage="prior")
    assert loaded.path.name == FIRST
    expected = load_file(checkpoints / FIRST / "ema.safetensors")
    for key, value in loaded.model.state_dict().items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    result = make_trainer(run_dir, resume=True).fit()
    assert f"resumed from {checkpoints / FIRST} at step 4" in capsys.readouterr().out
    assert result.step == 12 and (checkpoints / "latest").read_text() == LAST
    assert not list(checkpoints.glob(".tmp-*")), "the crashed save's temporary directory was left behind"
    for name, reference in straight_run.items():
        resumed = load_file(checkpoints / LAST / name)
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=f"{name}:{key}")


def test_latest_always_names_a_complete_checkpoint_even_with_a_newer_orphan(tmp_path):
    """A kill between committing a checkpoint and updating `latest` (see above) leaves an orphan newer than
    `latest`. Resuming with other checkpoint settings must never prune the checkpoint `latest` names."""
    make_trainer(tmp_path, max_steps=8).fit()
    (tmp_path / "checkpoints" / "latest").write_text(FIRST)  # as if killed before `latest` moved to SECOND
    seen = []

    def latest_loads(model):
        seen.append(load_stage(tmp_path, stage="prior").path.name)

    trainer = make_trainer(tmp_path, resume=True, checkpoint_every=1, keep_checkpoints=1)
    trainer.after_step_fn = latest_loads
    trainer.fit()
    assert seen == [FIRST, "step-00000005", "step-00000006", "step-00000007", SECOND, "step-00000009",
                    "step-00000010", "step-00000011"]


def test_weights_of_the_wrong_shape_are_a_clear_error(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    weights = tmp_path / "checkpoints" / FIRST / "ema.safetensors"
    state = load_file(weights)
    state["embed_mean"] = torch.zeros(EMBED_DIM + 1)  # a valid file of another model
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"(?s)ema.safetensors does not fit the model.*embed_mean"):
        load_stage(tmp_path)


@pytest.mark.parametrize("damage", ["ema.safetensors", "trainer/optimizer.bin", "trainer.json"])
def test_resuming_from_a_damaged_training_checkpoint_is_a_clear_error(tmp_path, damage):
    make_trainer(tmp_path, max_steps=4).fit()
    path = tmp_path / "checkpoints" / FIRST / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"cannot resume from .*{FIRST}.*trainer.overwrite=true"):
        make_trainer(tmp_path, max_steps=8, resume=True).fit()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one precision per process: start from scratch, and leave it so for later tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_gradient_overflow_lowers_the_loss_scale_and_training_goes_on(tmp_path, fresh_accelerate_state):
    """On a GPU, fp16 runs through a GradScaler; an overflowing step must be skipped, not end the run.

    The CPU has no fp16 GradScaler in accelerate, so the test installs torch's CPU one as accelerate does
    on a GPU."""
    accelerator = Accelerator(mixed_precision="fp16")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**16), True
    calls, updates = [], []

    def overflowing_twice(model, batch):
        calls.append(1)
        out = prior_loss(model, batch)
        if len(calls) in (3, 4):
            out["loss"] = out["loss"] * 1e34  # finite in float32; its scaled gradients overflow
        return out

    trainer = make_trainer(tmp_path, overflowing_twice, max_steps=8, mixed_precision="fp16", checkpoint_every=0,
                           trainer_kwargs={"accelerator": accelerator, "after_step_fn": lambda model: updates.append(1)})
    assert trainer.fit().step == 8
    assert len(updates) == 6 and accelerator.scaler.get_scale() == 2.0**14  # halved at each overflow
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
