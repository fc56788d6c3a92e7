"""trainer.mixed_precision=auto (unclip.training.precision): the rule on every device, the FLOP count it reads,
and the Trainer that follows it. The CUDA branch runs here with the device and the GPU's bf16 support stubbed."""

import pytest
import torch
from accelerate.state import AcceleratorState
from torch import nn

from unclip.data.collate import collate_dicts
from unclip.flops import device_peak
from unclip.training import Trainer, TrainerConfig
from unclip.training import precision as auto


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

    @property
    def config(self):
        return {"_target_": "tests.Regression"}


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = torch.randn(8, generator=torch.Generator().manual_seed(i))
        return {"x": x, "y": x[:4] * 2, "issues": {}}


class StreamOfItems:
    """A streaming source: no ``__getitem__``, items come from ``stream(rank, world_size, seed)``."""

    def stream(self, rank, world_size, seed):
        return iter(Items()[i] for i in range(len(Items())))


def regression_loss(model, batch):
    return {"loss": (model.net(batch["x"]) - batch["y"]).square().mean()}


def step_flops_by_hand(batch: int) -> int:  # see tests/test_flops.py: forward and backward products
    first, second = 2 * batch * 8 * 16, 2 * batch * 16 * 4
    return 2 * (first + second) + second


def never(*_):
    raise AssertionError("the rule needs no FLOP count here")


def test_the_rule_on_the_cpu_follows_its_native_bf16():
    assert auto.choose_mixed_precision("cpu", never, bf16_supported=True)[0] == "bf16"
    assert auto.choose_mixed_precision("cpu", never, bf16_supported=False)[0] == "no"
    expected = "bf16" if auto.cpu_has_native_bf16() else "no"
    assert auto.choose_mixed_precision("cpu", never)[0] == expected


def test_a_pipeline_samples_in_bf16_only_where_the_device_computes_it_natively():
    assert auto.sampling_dtype("cpu", torch.bfloat16, bf16_supported=True) == torch.bfloat16
    assert auto.sampling_dtype("cpu", torch.bfloat16, bf16_supported=False) is None  # emulated: float32
    assert auto.sampling_dtype("cuda", torch.bfloat16, bf16_supported=False) is None
    assert auto.sampling_dtype("mps", torch.bfloat16, bf16_supported=True) is None  # no measured rule there
    assert auto.sampling_dtype("cpu", None, bf16_supported=True) is None  # a pipeline that samples in float32
    expected = torch.bfloat16 if auto.cpu_has_native_bf16() else None
    assert auto.sampling_dtype("cpu", torch.bfloat16) == expected


def test_the_rule_on_cuda_takes_bf16_from_one_tflop_a_step():
    threshold = auto.BF16_MIN_STEP_TFLOP * 1e12
    assert auto.choose_mixed_precision("cuda", lambda: 4.1e12, bf16_supported=True)[0] == "bf16"  # prior, batch 512
    assert auto.choose_mixed_precision("cuda", lambda: threshold, bf16_supported=True)[0] == "bf16"
    assert auto.choose_mixed_precision("cuda", lambda: 0.26e12, bf16_supported=True)[0] == "no"  # prior, batch 32
    assert auto.choose_mixed_precision("cuda", lambda: 0.36e12, bf16_supported=True)[0] == "no"  # decoder, batch 8
    assert auto.choose_mixed_precision("cuda", never, bf16_supported=False)[0] == "no"
    precision, reason = auto.choose_mixed_precision("cuda", lambda: None, bf16_supported=True)
    assert precision == "bf16" and "could not be counted" in reason
    assert auto.choose_mixed_precision("mps", never)[0] == "no"


def test_the_count_runs_forward_and_backward_on_a_few_items_and_scales_to_the_batch():
    model = Regression()
    batch, items = auto.first_items(Items(), collate_dicts, 2, seed=0)
    assert items == 2 and "issues" not in batch
    assert auto.training_step_flops(model, regression_loss, batch, items, batch_size=64) == step_flops_by_hand(64)
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients behind
    batch, items = auto.first_items(StreamOfItems(), collate_dicts, 3, seed=0)
    assert items == 3 and batch["x"].shape == (3, 8)


def config(**overrides) -> TrainerConfig:
    settings = dict(max_steps=2, batch_size=8, lr=1e-2, warmup_steps=1, ema_update_after_step=0, checkpoint_every=0,
                    log_every=1, progress=False)
    return TrainerConfig(**{**settings, **overrides})


def test_auto_on_a_gpu_counts_the_step_and_compares_it_with_the_threshold(monkeypatch):
    monkeypatch.setattr(auto, "training_device_type", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    choice = auto.resolve_precision(config(), Regression(), regression_loss, Items(), collate_dicts)
    assert (choice.mixed_precision, choice.step_flops) == ("no", step_flops_by_hand(8))
    assert "trainer.mixed_precision=auto: no on cuda, since a training step does" in choice.reason
    monkeypatch.setattr(auto, "BF16_MIN_STEP_TFLOP", 1e-9)  # 1 kFLOP
    choice = auto.resolve_precision(config(), Regression(), regression_loss, Items(), collate_dicts)
    assert choice.mixed_precision == "bf16"
    # an explicit precision overrides the rule; on CUDA the step is still counted for the log line's MFU
    choice = auto.resolve_precision(config(mixed_precision="no"), Regression(), regression_loss, Items(),
                                    collate_dicts)
    assert (choice.mixed_precision, choice.step_flops) == ("no", step_flops_by_hand(8))


def test_a_loss_that_cannot_run_before_training_leaves_the_count_out(monkeypatch):
    monkeypatch.setattr(auto, "training_device_type", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def needs_the_gpu(model, batch):
        raise RuntimeError("Expected all tensors to be on the same device")

    choice = auto.resolve_precision(config(), Regression(), needs_the_gpu, Items(), collate_dicts)
    assert (choice.mixed_precision, choice.step_flops) == ("bf16", None)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one precision per process: start from scratch, and leave it so for later tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_trainer_trains_in_the_precision_auto_picks_and_says_why(tmp_path, capsys, fresh_accelerate_state):
    assert TrainerConfig().mixed_precision == "auto"
    trainer = Trainer(Regression(), regression_loss, Items(), config(), tmp_path, stage="toy", space_fn=lambda m: None)
    device = auto.training_device_type()
    if device == "cpu":
        expected = "bf16" if auto.cpu_has_native_bf16() else "no"
    else:  # a GPU (or another device): a step of this toy is far below a TFLOP
        expected = "no"
    assert trainer.accelerator.mixed_precision == expected
    assert f"trainer.mixed_precision=auto: {expected} on {device}" in capsys.readouterr().out
    result = trainer.fit()
    # the CPU's peak is unknown; a GPU's is known where the table has it
    known_peak = device == "cuda" and device_peak(trainer.accelerator.device) is not None
    assert result.step == 2 and ("mfu" in result.history[-1]) == known_peak
    AcceleratorState._reset_state(reset_partial_state=True)
    explicit = Trainer(Regression(), regression_loss, Items(), config(mixed_precision="no"), tmp_path / "fp32",
                       stage="toy", space_fn=lambda m: None)
    assert explicit.accelerator.mixed_precision == "no"


def test_a_bad_precision_names_the_choices():
    with pytest.raises(ValueError, match=r"trainer.mixed_precision must be one of \('auto', 'no', 'bf16', 'fp16'\), "
                                         "got 'fp8'"):
        TrainerConfig(mixed_precision="fp8")
