"""The CPU attention kernel: the Trainer runs a CLIP's training steps with the math kernel (the CPU flash kernel's
backward is the slow one at these sequence lengths, bench/clip_training.py), encoding keeps SDPA's own choice, and
the kernel changes the speed, not what is trained."""

import contextlib

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from unclip.attention_kernels import cpu_math_attention, training_attention
from unclip.clip import ContrastiveLoss
from unclip.training import Trainer, TrainerConfig

FLASH = "_scaled_dot_product_flash_attention"


def attention_ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def batch(n=4):
    return {"image": torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
            "caption": ["a red circle", "a blue square at the top", "two green triangles", "a small pink diamond"][:n]}


def test_the_math_kernel_is_chosen_on_the_cpu_only_where_asked():
    q = k = v = torch.randn(2, 2, 8, 16)
    flash = attention_ops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert any(FLASH in op for op in flash)  # without the context, this torch picks flash on the CPU
    with cpu_math_attention("cpu"):
        assert not any(FLASH in op for op in attention_ops(lambda: F.scaled_dot_product_attention(q, k, v)))
    for device, when in (("cpu", False), ("cuda", True)):
        with cpu_math_attention(device, when=when):
            assert attention_ops(lambda: F.scaled_dot_product_attention(q, k, v)) == flash
    with training_attention(torch.nn.Linear(2, 2), "cpu"):  # a model that does not ask for it
        assert attention_ops(lambda: F.scaled_dot_product_attention(q, k, v)) == flash


class Scenes(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        items = batch()
        return {"image": items["image"][i % 4], "caption": items["caption"][i % 4]}


def test_the_trainer_trains_a_clip_with_the_math_kernel_and_encoding_keeps_flash(micro_clip, tmp_path):
    config = TrainerConfig(max_steps=2, batch_size=4, warmup_steps=0, checkpoint_every=0, progress=False,
                           mixed_precision="no")  # as every in-process Trainer: accelerate keeps one state
    trainer = Trainer(micro_clip, ContrastiveLoss(), Scenes(), config, tmp_path, stage="clip", space_fn=lambda m: None)
    trained = attention_ops(trainer.fit)  # every step's forward and backward (and the final checkpoint)
    assert trained and not any(FLASH in op for op in trained)
    micro_clip.eval()
    with torch.no_grad():
        encoded = attention_ops(lambda: (micro_clip.encode_image(batch()["image"]), micro_clip.encode_text(batch()["caption"])))
    assert any(FLASH in op for op in encoded)


def test_the_kernel_changes_the_speed_not_the_gradients(micro_clip):
    micro_clip.train()

    def grads(context):
        micro_clip.zero_grad(set_to_none=True)
        with context:
            ContrastiveLoss()(micro_clip, batch())["loss"].backward()  # fp32: the kernels agree to rounding
        return {n: p.grad.clone() for n, p in micro_clip.named_parameters() if p.grad is not None}

    math, flash = grads(training_attention(micro_clip, "cpu")), grads(contextlib.nullcontext())
    assert math.keys() == flash.keys() and len(math) > 10
    for name in math:
        scale = flash[name].abs().max().item()
        assert (math[name] - flash[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name
