import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from torch import nn

from unclip.training import NonFiniteLossError, StreamBatchSampler, Trainer, TrainerConfig, lr_at


class Toy(nn.Module):
    """A small noisy regression problem that uses dropout and the global RNG (as diffusion losses do)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.1), nn.GELU(), nn.Linear(32, 1))
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")]), persistent=False)  # like a causal mask

    @property
    def config(self):
        return {"_target_": "tests.Toy"}


class ToyData(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return {"x": x, "y": x.sum(0, keepdim=True)}


def toy_loss(model, batch):
    noise = 0.01 * torch.randn_like(batch["y"])  # global RNG, restored on resume
    return {"loss": ((model.net(batch["x"]) - batch["y"] - noise) ** 2).mean()}


def make_trainer(run_dir, **overrides):
    torch.manual_seed(0)
    settings = dict(max_steps=12, batch_size=8, lr=1e-2, warmup_steps=3, mixed_precision="no", ema_beta=0.9,
                    ema_update_after_step=2, checkpoint_every=4, log_every=2, progress=False)
    settings.update(overrides)
    return Trainer(Toy(), toy_loss, ToyData(), TrainerConfig(**settings), run_dir, stage="toy", space_fn=lambda m: None)


def test_loss_falls_and_checkpoints_rotate(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=60, checkpoint_every=20)
    result = trainer.fit()
    assert result.history[-1]["loss"] < 0.3 * result.history[0]["loss"]
    assert torch.equal(trainer.ema.ema_model.mask, trainer.model.mask)  # buffers copied, never averaged to NaN
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["latest", "step-00000040", "step-00000060"]  # keep_checkpoints=2
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000060"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("samples_per_s" in r for r in records if "loss" in r)


def _state(run_dir):
    path = Path(run_dir) / "checkpoints" / "step-00000012"
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors"), path


def test_resume_after_a_crash_ends_with_the_same_weights_ema_and_optimizer(tmp_path):
    make_trainer(tmp_path / "straight").fit()

    class Crash(Exception):
        pass

    calls = []

    def crash_after_step_10(model):
        calls.append(1)
        if len(calls) == 10:
            raise Crash

    crashing = make_trainer(tmp_path / "crashed")
    crashing.after_step_fn = crash_after_step_10
    with pytest.raises(Crash):
        crashing.fit()
    assert (tmp_path / "crashed" / "checkpoints" / "latest").read_text() == "step-00000008"
    resumed = make_trainer(tmp_path / "crashed", resume=True)
    resumed.fit()

    model_a, ema_a, path_a = _state(tmp_path / "straight")
    model_b, ema_b, path_b = _state(tmp_path / "crashed")
    for key in model_a:
        torch.testing.assert_close(model_a[key], model_b[key], rtol=0, atol=0)
    for key in ema_a:
        torch.testing.assert_close(ema_a[key], ema_b[key], rtol=0, atol=0)
    opt_a = torch.load(path_a / "trainer" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(path_b / "trainer" / "optimizer.bin", weights_only=True)
    for key, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][key][name], rtol=0, atol=0)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    with pytest.raises(FileExistsError, match="trainer.resume=true"):
        make_trainer(tmp_path, max_steps=4).fit()
    make_trainer(tmp_path, max_steps=4, overwrite=True).fit()


def test_non_finite_losses_are_skipped_then_stop_with_the_last_checkpoint(tmp_path):
    steps = []

    def sometimes_nan(model, batch):
        steps.append(1)
        out = toy_loss(model, batch)
        if len(steps) in (3, 5):  # two isolated bad steps: skipped
            out["loss"] = out["loss"] * float("nan")
        if len(steps) >= 9:  # then only bad ones
            out["loss"] = out["loss"] * float("inf")
        return out

    trainer = make_trainer(tmp_path, max_steps=30, max_bad_steps=4)
    trainer.wrapped.loss_fn = sometimes_nan
    with pytest.raises(NonFiniteLossError, match=r"4 consecutive steps.*step-00000008"):
        trainer.fit()
    skipped = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "skipped" in line]
    assert len(skipped) == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_stream_sampler_shards_the_same_items_as_one_bigger_batch_and_resumes():
    one = StreamBatchSampler(37, 8, seed=3)
    two = [StreamBatchSampler(37, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for batch in range(12):  # crosses several epochs
        assert one.batch_indices(batch) == two[0].batch_indices(batch) + two[1].batch_indices(batch)
    resumed = iter(StreamBatchSampler(37, 8, seed=3, start_batch=5))
    assert next(resumed) == one.batch_indices(5)
    epoch = [i for b in range(37) for i in StreamBatchSampler(37, 1, seed=0).batch_indices(b)]
    assert sorted(epoch) == list(range(37))  # each epoch is a permutation


def test_learning_rate_warms_up_then_decays():
    cfg = TrainerConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_bad_trainer_settings_name_the_value():
    with pytest.raises(ValueError, match="trainer.mixed_precision must be one of .* got 'fp8'"):
        TrainerConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match=r"unknown trainer settings \['max_stepz'\]"):
        TrainerConfig.from_dict({"max_stepz": 3})


CLIP_JOB = [
    "train/clip.py", "experiment=shapes", "clip=micro_vit", "data.image_size=32", "trainer.batch_size=16",
    "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.warmup_steps=2", "trainer.eval_every=0",
    "trainer.ema_update_after_step=2", "trainer.progress=false", "data.val.length=32", "data.heldout.length=16",
]


# The 64 -> 256 upsampler's recipe (conf/upsampler/unet_64_256.yaml: convolutional, random crops, blurred input) in small.
CROP_UPSAMPLER_JOB = [
    "train/upsampler.py", "experiment=shapes", "upsampler=unet_64_256", "upsampler.low_res_size=16",
    "upsampler.image_size=64", "upsampler.train_crop=32", "data.image_size=64", "trainer.batch_size=4",
    "trainer.max_steps=20", "trainer.checkpoint_every=4", "trainer.warmup_steps=2", "trainer.ema_update_after_step=2",
    "trainer.preview_every=0", "trainer.progress=false", "evaluation.val_items=2", "evaluation.steps=2",
]


def _run_clip(run_dir, *extra, wait=True, job=CLIP_JOB):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, *job, f"hydra.run.dir={run_dir}", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out
    return proc


@pytest.mark.slow
def test_clip_job_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    out = _run_clip(tmp_path / "straight")
    metrics = json.loads(out.strip().splitlines()[-1])  # the last line is metrics.json
    assert metrics == json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert {"zero_shot_top1_val", "zero_shot_top1_heldout", "image_to_text_R@1_val", "text_to_image_R@1_val",
            "pair_binding", "pair_binding_beats_order_reversed"} <= set(metrics)

    _killed_resumes_as_straight(tmp_path, CLIP_JOB, steps=12)


@pytest.mark.slow
def test_crop_trained_upsampler_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    metrics = json.loads(_run_clip(tmp_path / "straight", job=CROP_UPSAMPLER_JOB).strip().splitlines()[-1])
    assert {"psnr_val", "psnr_bicubic_val"} <= set(metrics)
    _killed_resumes_as_straight(tmp_path, CROP_UPSAMPLER_JOB, steps=20)


def _killed_resumes_as_straight(tmp_path, job, steps: int) -> None:
    """``job`` SIGKILLed after its step-8 checkpoint and resumed ends with the weights of the run in ``straight``."""
    proc = _run_clip(tmp_path / "killed", wait=False, job=job)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-00000008"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() < f"step-{steps:08d}", "the run ended before it could be killed"
    _run_clip(tmp_path / "killed", "trainer.resume=true", job=job)
    final = f"checkpoints/step-{steps:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / final / name)
        b = load_file(tmp_path / "killed" / final / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")


class DirtyToyData(ToyData):
    """ToyData whose every fifth item reports a skipped bad file before it, like the folder source does."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["issues"] = {"corrupt_image": 1} if i % 5 == 0 else {}
        return item


class ToyStream:
    """A streaming source (the shape of WebDatasetSource): each process reads its own half of 40 items."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def stream(self, rank, world_size, seed):
        source = self

        class Items(torch.utils.data.IterableDataset):
            def __iter__(self):
                order = torch.randperm(40, generator=torch.Generator().manual_seed(seed)).tolist()
                for i in order[rank::world_size]:
                    source.seen.append((seed, i))
                    item = ToyData()[i]
                    item["issues"] = {"empty_caption": 1} if i % 10 == 0 else {}
                    yield item

        return Items()


def test_data_issues_are_counted_per_epoch_and_reported(tmp_path):
    settings = dict(max_steps=25, batch_size=8, lr=1e-2, warmup_steps=3, mixed_precision="no", ema_beta=0.9,
                    ema_update_after_step=2, checkpoint_every=0, log_every=5, progress=False)
    torch.manual_seed(0)
    trainer = Trainer(Toy(), toy_loss, DirtyToyData(), TrainerConfig(**settings), tmp_path, stage="toy",
                      space_fn=lambda m: None)
    result = trainer.fit()
    # 25 steps x 8 = 200 items = 4 epochs of 50, each with the 10 items i % 5 == 0.
    assert result.metrics["data_issues"] == {"corrupt_image": 40}
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    # An epoch is reported at the end of the step that finishes it (a batch may straddle two epochs).
    assert sum(r["data_issues"]["corrupt_image"] for r in epochs) == 40
    assert all(8 <= r["data_issues"]["corrupt_image"] <= 12 for r in epochs)


def test_streaming_source_runs_epoch_after_epoch_with_new_shuffles(tmp_path):
    settings = dict(max_steps=12, batch_size=8, lr=1e-2, warmup_steps=3, mixed_precision="no", ema_beta=0.9,
                    ema_update_after_step=2, checkpoint_every=0, log_every=4, progress=False)
    torch.manual_seed(0)
    source = ToyStream()
    trainer = Trainer(Toy(), toy_loss, source, TrainerConfig(**settings), tmp_path, stage="toy",
                      space_fn=lambda m: None)
    result = trainer.fit()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # 40 items = 5 batches an epoch: 12 steps read 3 epochs, each a new permutation of all 40 items.
    seeds = sorted({seed for seed, _ in source.seen})
    assert len(seeds) == 3
    for seed in seeds[:2]:
        assert sorted(i for s, i in source.seen if s == seed) == list(range(40))
    assert result.metrics["data_issues"]["empty_caption"] >= 8


def test_weights_gone_nan_fail_the_run_loudly_keeping_the_last_good_checkpoint(tmp_path):
    from unclip.jobs import Job
    from unclip.training import NonFiniteWeightsError

    def poison_after_step_6(model):
        steps.append(1)
        if len(steps) == 6:
            with torch.no_grad():
                model.net[0].weight[0, 0] = float("nan")

    steps = []
    trainer = make_trainer(tmp_path, max_steps=12)
    trainer.after_step_fn = poison_after_step_6
    with pytest.raises(NonFiniteWeightsError, match=r"training toy failed at step 8: the model's weights hold NaN or "
                                                    r"infinite values \(weights: 1 tensor\(s\) \(net.0.weight\).*"
                                                    r"Last good checkpoint: .*step-00000004"):
        Job(run_dir=tmp_path, config={}).fit(trainer)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004"  # the NaN weights were not saved
    assert not (tmp_path / "metrics.json").exists()  # no metrics claim a result


def test_a_run_that_diverged_short_of_max_bad_steps_fails_and_logs_no_loss_of_0(tmp_path):
    from unclip.jobs import Job

    def nan_after_the_first_step(model, batch):
        calls.append(1)
        out = toy_loss(model, batch)
        return {"loss": out["loss"] * float("nan")} if len(calls) > 1 else out

    calls = []
    trainer = make_trainer(tmp_path, max_steps=8, max_bad_steps=10, checkpoint_every=0)
    trainer.wrapped.loss_fn = nan_after_the_first_step
    with pytest.raises(NonFiniteLossError, match=r"training toy diverged: the last 7 of the 8 steps of this run had a "
                                                 r"non-finite loss or gradient, so nothing was saved or evaluated"):
        Job(run_dir=tmp_path, config={}).fit(trainer)
    assert not (tmp_path / "metrics.json").exists() and not list((tmp_path / "checkpoints").glob("step-*"))
    windows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "lr" in line]
    assert [(w["step"], w["loss"], w.get("non_finite_steps")) for w in windows[1:]] == [(4, None, 2), (6, None, 2),
                                                                                       (8, None, 2)]
    assert windows[0]["step"] == 2 and windows[0]["loss"] > 0 and windows[0]["non_finite_steps"] == 1


def test_a_clip_job_at_a_huge_learning_rate_exits_non_zero_without_metrics(tmp_path):
    """The report's reproduction with a large lr: one step at lr=1e6 leaves finite but huge weights whose losses and
    similarities are all NaN; it exited 0 with every R@k = 1.0."""
    proc = subprocess.run([sys.executable, *CLIP_JOB, f"hydra.run.dir={tmp_path}", "trainer.max_steps=8",
                           "trainer.warmup_steps=0", "trainer.lr=1e6"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "training clip diverged: the last 7 of the 8 steps" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "checkpoints" / "step-00000008").exists()
