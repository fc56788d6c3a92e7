"""The training loop's pieces on their own: the data stream, the log window, one optimisation step, the hooks."""

import math

import torch
from test_training import ToyData, ToyStream, make_trainer

from unclip.data.collate import collate_dicts
from unclip.training.data import DataStream
from unclip.training.tracking import LogWindow, StepOutcome


class IssueData(ToyData):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {**super().__getitem__(i), "issues": {"corrupt_image": 1} if i < 3 else {}}


def test_map_style_stream_ends_epochs_by_position_and_resumes_at_the_same_batch():
    ended = []
    stream = DataStream(IssueData(), batch_size=4, collate_fn=collate_dicts, seed=1,
                        on_epoch_end=lambda epoch, issues: ended.append((epoch, issues)))
    batches = stream.batches()
    seen = []
    for _ in range(5):  # 20 items: two epochs of 10
        seen.append(next(batches)["x"])
        stream.advance(4)
    assert [epoch for epoch, _ in ended] == [1, 2] and stream.position == 20
    assert sum(issues.get("corrupt_image", 0) for _, issues in ended) == 6  # 3 bad items an epoch, taken out
    resumed = DataStream(IssueData(), batch_size=4, collate_fn=collate_dicts, seed=1)
    resumed.load_state({"stream_position": 12, "epoch": 1}, default_position=0)
    torch.testing.assert_close(next(resumed.batches())["x"], seen[3])


def test_streaming_source_ends_an_epoch_when_the_stream_runs_out():
    ended = []
    stream = DataStream(ToyStream(), batch_size=8, collate_fn=collate_dicts,
                        on_epoch_end=lambda epoch, issues: ended.append(epoch))
    assert stream.streaming
    batches = stream.batches()
    for _ in range(6):  # 40 items a pass: 5 batches, the sixth starts epoch 2
        next(batches)
        stream.advance(8)
    assert ended == [1] and stream.epoch == 1


def test_log_window_averages_the_applied_steps_and_restarts():
    window = LogWindow(samples_per_step=16)
    window.add(StepOutcome(True, {"loss": 1.0}))
    window.add(StepOutcome(False, {"loss": math.inf}))  # skipped: not in the mean
    last = StepOutcome(True, {"loss": 3.0, "mse": 0.5}, grad_norm=torch.tensor(2.0))
    window.add(last)
    record = window.record(step=3, lr=0.1, last=last)
    assert record["loss"] == 2.0 and record["mse"] == 0.5 and record["grad_norm"] == 2.0
    assert record["samples_per_s"] > 0 and window.steps == 0 and window.loss_count == 0


def test_one_optimisation_step_updates_or_skips(tmp_path):
    trainer = make_trainer(tmp_path, ema_update_after_step=0)
    batches = trainer.data.batches()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    outcome = trainer._optimisation_step(batches)
    assert outcome.finite and outcome.grad_norm is not None and trainer.bad_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.ema.step.item() == 1

    trainer.wrapped.loss_fn = lambda model, batch: {"loss": model.net(batch["x"]).sum() * math.nan}
    before = [p.detach().clone() for p in trainer.model.parameters()]
    outcome = trainer._optimisation_step(batches)
    assert not outcome.finite and trainer.bad_steps == 1 and trainer.ema.step.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_periodic_hooks_run_when_due(tmp_path):
    trainer = make_trainer(tmp_path, checkpoint_every=4, eval_every=6)
    evaluated = []
    trainer.evaluate_fn = lambda model: evaluated.append(trainer.step) or {}
    trainer._start()
    for step in range(1, 13):
        trainer.step = step
        trainer._run_periodic_hooks()
    assert evaluated == [6, 12]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000008", "step-00000012"]


def test_a_run_draws_its_curves_and_logs_to_tensorboard_beside_log_jsonl(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    from PIL import Image

    trainer = make_trainer(tmp_path / "a", log_with="tensorboard", eval_every=4)
    trainer.evaluate_fn = lambda model: {"mse": float(trainer.step)}
    trainer.fit()
    assert Image.open(tmp_path / "a" / "curves.png").size[0] > 100
    events = list((tmp_path / "a" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event files"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "eval/mse"} <= scalars

    make_trainer(tmp_path / "b", max_steps=8).fit()
    out = tmp_path / "compare.png"
    proc = subprocess.run([sys.executable, "train/plot.py", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > Image.open(tmp_path / "b" / "curves.png").size[0]  # loss and mse panels


def test_an_unknown_tracker_is_an_error_naming_the_setting():
    import pytest

    from unclip.training import TrainerConfig

    with pytest.raises(ValueError, match=r"trainer.log_with must be one of \('tensorboard'.* got 'tensorbored'"):
        TrainerConfig(log_with="tensorbored")


def test_curves_put_a_metrics_sample_count_in_its_panels_title_not_in_a_panel_of_its_own():
    from unclip.training.curves import panels, series

    records = [{"step": 1, "loss": 0.5, "samples_per_s": 10.0},
               {"step": 100, "eval": {"fid_clip_g3_val": 0.7, "n_fid_clip_g3_val": 48, "colour_acc_g3_val": 0.2}},
               {"step": 200, "eval": {"fid_clip_g3_val": 0.3, "n_fid_clip_g3_val": 48, "colour_acc_g3_val": 0.5}}]
    other = [{"step": 100, "eval": {"fid_clip_g3_val": 0.9, "n_fid_clip_g3_val": 24}}]
    assert panels([series(records)]) == {"loss": "loss", "fid_clip_g3_val": "fid_clip_g3_val (n=48)",
                                         "colour_acc_g3_val": "colour_acc_g3_val"}
    assert panels([series(records), series(other)])["fid_clip_g3_val"] == "fid_clip_g3_val (n=24, 48)"
