"""Data-parallel training equals one process with the global batch.

``accelerate.debug_launcher`` forks two real processes joined by a gloo group on the CPU (``accelerate
launch --cpu --num_processes 2`` would silently run one). Each stage trains for ``STEPS`` steps with the
real ``Trainer``: on 2 processes with per-process batch ``B`` and on 1 process with batch ``2B``, same seed,
full precision. The stream sampler gives process r the r-th half of each global batch, DDP averages the
gradients, so the weights must agree to float round-off.

The diffusion losses draw timesteps, noise and condition dropout at random; the global RNG is the same
on every process, so here each data item carries its own draws (seeded by its index) and the same item
gets the same noise whichever process sees it.

Tolerance. The two runs sum the same gradients in a different order, so they differ by float round-off,
and AdamW divides each gradient by its own running magnitude: where a gradient is round-off alone, that
round-off becomes a step of arbitrary sign. Such elements exist (biases just before a GroupNorm with one
channel per group, layers behind the decoder's zero-initialised output), and the attention key bias of
nn.MultiheadAttention (open_clip) is the extreme case: softmax ignores it, its exact gradient is zero,
so it is left out of the comparison. Everything else must agree to ``ATOL`` per element (5% of one
AdamW step at lr 1e-3) and, taken as one vector, the two runs' updates to ``REL`` relative; training
without gathered negatives misses them by 10x and 100x or more.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import debug_launcher
from conftest import MICRO_CLIP
from open_clip.loss import ClipLoss
from stages import TINY_UNET, final_weights, fit_tiny, on_each_process

from unclip.clip import ContrastiveLoss, OpenClipEncoder, clamp_logit_scale
from unclip.data.collate import collate_dicts
from unclip.data.shapes import ShapesDataset, collate
from unclip.decoder import Decoder, Upsampler
from unclip.embedding import TextCondition
from unclip.prior import AutoregressivePrior, DiffusionPrior
from unclip.training import StreamBatchSampler, Trainer, TrainerConfig

# accelerate's debug_launcher joins its processes on a fixed port (29500): under pytest-xdist every test that uses
# it runs in one worker, one after another (make test: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("debug_launcher_port")
STEPS = 4
BATCH = 4  # per process; the one-process reference uses 2 * BATCH
ITEMS = 2 * BATCH * STEPS  # one epoch: every item is seen once
LR = 1e-3
ATOL = 5e-5  # per weight (the largest difference seen: 7e-6)
REL = 1e-3  # of the whole update (seen: 3e-5)
EMBED_DIM, TOKEN_DIM, TEXT_LENGTH, NUM_STEPS = 16, 8, 6, 50


def _item_generator(index: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000 + index)


class RandomEmbeddings(torch.utils.data.Dataset):
    """Prior training items (as EmbeddingShards gives them) plus the item's own diffusion draws."""

    def __len__(self):
        return ITEMS

    def __getitem__(self, index):
        g = _item_generator(index)
        length = int(torch.randint(2, TEXT_LENGTH + 1, (), generator=g))
        return {
            "image_embed": torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
            "text_embed": torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
            "token_embeds": torch.randn(TEXT_LENGTH, TOKEN_DIM, generator=g),
            "mask": torch.arange(TEXT_LENGTH) < length,
            "t": torch.randint(0, NUM_STEPS, (), generator=g),
            "noise": torch.randn(EMBED_DIM, generator=g),
            "drop": torch.rand((), generator=g) < 0.3,
        }


class RandomImages(torch.utils.data.Dataset):
    """Decoder training items: an image, its embedding, caption tokens, and the item's own draws."""

    def __len__(self):
        return ITEMS

    def __getitem__(self, index):
        g = _item_generator(index)
        length = int(torch.randint(2, TEXT_LENGTH + 1, (), generator=g))
        tokens = torch.zeros(TEXT_LENGTH, dtype=torch.long)
        tokens[:length] = torch.randint(1, 60, (length,), generator=g)
        tokens[length - 1] = 63  # the end token: the highest id
        return {
            "image": torch.rand(3, 16, 16, generator=g) * 2 - 1,
            "image_embed": torch.nn.functional.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
            "tokens": tokens,
            "mask": torch.arange(TEXT_LENGTH) < length,
            "t": torch.randint(0, NUM_STEPS, (), generator=g),
            "noise": torch.randn(3, 16, 16, generator=g),
            "drop_image_embed": torch.rand((), generator=g) < 0.3,
            "drop_caption": torch.rand((), generator=g) < 0.5,
        }


def prior_loss(model, batch):
    return model.training_loss(batch)


def decoder_loss(model, batch):
    text = TextCondition(
        embed=batch["image_embed"],  # not read by the caption transformer
        tokens=batch["tokens"],
        token_embeds=torch.zeros(*batch["tokens"].shape, TOKEN_DIM, device=batch["tokens"].device),
        mask=batch["mask"],
    )
    return model.training_loss(
        batch["image"], batch["image_embed"], text, t=batch["t"], noise=batch["noise"],
        drop_image_embed=batch["drop_image_embed"], drop_caption=batch["drop_caption"],
    )


class RandomCropImages(torch.utils.data.Dataset):
    """Upsampler training items (a 32-px image, trained on 16-px crops) and the item's own draws."""

    def __len__(self):
        return ITEMS

    def __getitem__(self, index):
        g = _item_generator(index)
        return {"image": torch.rand(3, 32, 32, generator=g) * 2 - 1, "t": torch.randint(0, NUM_STEPS, (), generator=g),
                "noise": torch.randn(3, 16, 16, generator=g), "aug_noise": torch.randn(3, 16, 16, generator=g),
                "aug_level": torch.rand((), generator=g) * 0.2, "crop_at": torch.randint(0, 17, (2,), generator=g)}


def upsampler_loss(model, batch):
    return model.training_loss(batch["image"], **{key: batch[key] for key in ("t", "noise", "aug_noise", "aug_level",
                                                                               "crop_at")})


def local_contrastive_loss(encoder, batch):
    """The contrastive loss WITHOUT gathering: each process contrasts only its own slice of the batch."""
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    image_features = encoder.encode_image(batch["image"])
    text_features = encoder.encode_text(batch["caption"]).embed
    return {"loss": loss_fn(image_features, text_features, encoder.logit_scale.exp())}


def build_stage(name: str):
    """(model, loss_fn, dataset, collate_fn, after_step_fn) of a tiny stage, initialised from seed 0."""
    torch.manual_seed(0)
    if name in ("clip", "clip_without_gather"):
        model = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")
        loss = ContrastiveLoss() if name == "clip" else local_contrastive_loss
        return model, loss, ShapesDataset("train", length=ITEMS, image_size=32), collate, clamp_logit_scale
    if name == "prior":
        model = DiffusionPrior(embed_dim=EMBED_DIM, token_dim=TOKEN_DIM, text_length=TEXT_LENGTH,
                               net=dict(width=32, depth=2, heads=2), num_steps=NUM_STEPS, cond_drop_prob=0.3)
        model.fit_normalisation(torch.nn.functional.normalize(torch.randn(64, EMBED_DIM), dim=-1))
        return model, prior_loss, RandomEmbeddings(), collate_dicts, None
    if name == "prior_autoregressive":  # the same items: it reads "drop" (caption dropout), not the diffusion draws
        model = AutoregressivePrior(embed_dim=EMBED_DIM, token_dim=TOKEN_DIM, text_length=TEXT_LENGTH, width=32,
                                    depth=2, heads=2, num_buckets=16, cond_drop_prob=0.3)
        embeds = torch.nn.functional.normalize(torch.randn(64, EMBED_DIM), dim=-1)
        model.fit_normalisation(embeds, torch.nn.functional.normalize(embeds + torch.randn(64, EMBED_DIM), dim=-1))
        return model, prior_loss, RandomEmbeddings(), collate_dicts, None
    if name == "decoder":
        model = Decoder(image_size=16, image_embed_dim=EMBED_DIM, text_length=TEXT_LENGTH, unet=TINY_UNET,
                        caption_width=32, caption_layers=1, caption_heads=2, vocab_size=64, num_steps=NUM_STEPS)
        return model, decoder_loss, RandomImages(), collate_dicts, None
    if name == "upsampler_crops":  # the 64 -> 256 recipe in small: a convolutional UNet trained on crops
        model = Upsampler(low_res_size=8, image_size=32, num_steps=NUM_STEPS, train_crop=16, degradation="none",
                          unet={"base_channels": 16, "norm_groups": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                "attention_resolutions": [], "middle_attention": False})
        return model, upsampler_loss, RandomCropImages(), collate_dicts, None
    raise ValueError(name)


def train(name: str, run_dir: str, batch_size: int) -> None:
    model, loss_fn, dataset, collate_fn, after_step_fn = build_stage(name)
    fit_tiny(model, loss_fn, dataset, run_dir, stage=name, steps=STEPS, batch_size=batch_size, lr=LR,
             collate_fn=collate_fn, after_step_fn=after_step_fn)


def _compared(weights: dict) -> torch.Tensor:
    """All weights as one vector, without nn.MultiheadAttention's key bias (its exact gradient is zero)."""
    parts = []
    for name in sorted(weights):
        value = weights[name].float()
        if name.endswith("in_proj_bias"):
            query, _, value_bias = value.view(3, -1)  # [query | key | value] biases
            value = torch.cat([query, value_bias])
        parts.append(value.flatten())
    return torch.cat(parts)


def differences(a: dict, b: dict, initial: dict) -> tuple[float, float]:
    """(largest per-weight difference, |a - b| / |a - initial|) over the compared weights."""
    assert a.keys() == b.keys()
    a, b, initial = _compared(a), _compared(b), _compared({k: initial[k] for k in a})
    update = a - initial
    assert update.abs().max() > 10 * ATOL, "training did not change the weights: the comparison would prove nothing"
    return (a - b).abs().max().item(), ((a - b).norm() / update.norm()).item()


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The one-process references, trained lazily once per stage."""
    root, runs = tmp_path_factory.mktemp("one_process"), {}

    def get(name):
        if name not in runs:
            train(name, str(root / name), 2 * BATCH)
            runs[name] = final_weights(root / name, STEPS)
        return runs[name]

    return get


@pytest.mark.parametrize("name", ["clip", "prior", "prior_autoregressive", "decoder", "upsampler_crops"])
def test_two_processes_train_the_same_weights_as_one_with_the_global_batch(name, tmp_path, one_process_runs):
    debug_launcher(on_each_process, args=(train, name, str(tmp_path), BATCH), num_processes=2)
    model_2, ema_2, processes = final_weights(tmp_path, STEPS)
    model_1, ema_1, _ = one_process_runs(name)
    assert processes == 2
    initial = build_stage(name)[0].state_dict()
    largest, relative = differences(model_1, model_2, initial)
    assert largest < ATOL and relative < REL, f"weights differ by up to {largest:.2e} ({relative:.2e} of the update)"
    largest, relative = differences(ema_1, ema_2, initial)
    assert largest < ATOL and relative < REL, f"EMA weights differ by up to {largest:.2e} ({relative:.2e} of the update)"


def test_clip_without_gathered_negatives_trains_different_weights(tmp_path, one_process_runs):
    """The test above can fail: contrasting each process's slice on its own is a different objective."""
    debug_launcher(on_each_process, args=(train, "clip_without_gather", str(tmp_path), BATCH), num_processes=2)
    model_2, _, processes = final_weights(tmp_path, STEPS)
    model_1, _, _ = one_process_runs("clip")
    assert processes == 2
    largest, relative = differences(model_1, model_2, build_stage("clip")[0].state_dict())
    assert largest > 10 * ATOL and relative > 100 * REL


class LoggedEmbeddings(RandomEmbeddings):
    """Records the items this process reads."""

    seen: list[int] = []

    def __getitem__(self, index):
        self.seen.append(index)
        return super().__getitem__(index)


def test_a_two_process_checkpoint_resumes_on_one_process_where_the_stream_stopped(tmp_path, capsys):
    """Resuming with another number of processes continues the data stream at the global position reached."""
    debug_launcher(on_each_process, args=(train, "prior", str(tmp_path), BATCH), num_processes=2)
    model, _, dataset, collate_fn, _ = build_stage("prior")
    config = TrainerConfig(max_steps=STEPS + 2, batch_size=BATCH, lr=LR, mixed_precision="no", checkpoint_every=0,
                           progress=False, resume=True)
    LoggedEmbeddings.seen = []
    Trainer(model, prior_loss, LoggedEmbeddings(), config, tmp_path, stage="prior", space_fn=lambda m: None,
            collate_fn=collate_fn).fit()
    assert "written by 2 process(es), resuming with 1" in capsys.readouterr().out
    stream = StreamBatchSampler(ITEMS, 1, seed=0)
    reached = STEPS * 2 * BATCH  # the two processes consumed 2 * BATCH items per step
    assert LoggedEmbeddings.seen == [stream.batch_indices(p)[0] for p in range(reached, reached + 2 * BATCH)]


def test_accelerate_launch_multi_gpu_on_a_cpu_machine_trains_one_run_on_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` where no GPU is: accelerate (1.x) left each process alone
    unless asked for the CPU, so both were "main" processes and the second was refused the run directory; the
    Trainer asks for the CPU where CUDA is missing, and the two join over gloo."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = tmp_path / "run"
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "train/clip.py", "clip=micro_vit",
                           "data.image_size=32", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0",
                           f"hydra.run.dir={run}"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = json.loads((run / "checkpoints" / "step-00000002" / "trainer.json").read_text())
    assert state["num_processes"] == 2


def test_a_finished_job_leaves_its_process_group(tmp_path):
    """A job launched on several processes leaves the process group when it is done (``_job.end_process_group``,
    run by every ``@hydra_job`` after ``main``): left to the interpreter's exit, gloo's threads could abort a
    finished run ("terminate called without an active exception"). Outside a launch it does nothing."""
    import torch.distributed as dist
    from _job import end_process_group

    end_process_group()  # no process group: nothing to leave
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()
