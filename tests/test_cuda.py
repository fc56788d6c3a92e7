"""What only a GPU can show (marker ``cuda``: skipped where torch sees no CUDA device; bench/gpu.sh runs them).

Device placement of every stage and the pipeline, bf16 autocast, a few training steps of every stage through the
Trainer (and its checkpoints loading on the CPU), sampling replayed from CUDA graphs against eager sampling, the
fallback when a step cannot be captured, memory that graphed sampling gives back, the FLOP count and the auto
precision on a GPU, and the benchmarks' CUDA paths.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from conftest import ROOT
from stages import micro_stages

from unclip.checkpoint import load_stage, save_stage
from unclip.clip import ContrastiveLoss
from unclip.data.shapes import ShapesDataset
from unclip.diffusion import GaussianDiffusion, sample_ddim
from unclip.diffusion import graphs as graphs_module
from unclip.flops import count_flops, device_peak
from unclip.pipelines import UnCLIPPipeline
from unclip.training import Trainer, TrainerConfig

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one precision per process: start from scratch, and leave it so for later tests."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def on_cuda(*modules):
    return [m.to(CUDA).eval() for m in modules]


def test_the_stages_and_the_pipeline_move_to_the_gpu_and_generate_there():
    clip, prior, decoder, upsampler = micro_stages()
    pipe = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler]).to("cuda")
    assert pipe.device.type == "cuda"
    assert all(p.device.type == "cuda" for module in pipe.modules() for p in module.parameters())
    images = pipe.generate(["a red circle", "a blue square"], seed=0, prior_steps=6, decoder_steps=6,
                           upsampler_steps=6, output="tensor")
    assert images.device.type == "cuda" and images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    again = pipe.generate(["a red circle", "a blue square"], seed=0, prior_steps=6, decoder_steps=6,
                          upsampler_steps=6, output="tensor")
    torch.testing.assert_close(again, images)  # a seed gives the same images on the GPU too
    assert len(pipe.generate("a red circle", seed=0, prior_steps=4, decoder_steps=4, upsampler_steps=4)) == 1


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_the_loss_and_gradients_fp32():
    _, _, decoder, _ = micro_stages()
    decoder.to(CUDA)
    seen = []
    decoder.unet.input_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images = torch.rand(2, 3, 16, 16, device=CUDA) * 2 - 1
    embed = F.normalize(torch.randn(2, decoder.image_embed_dim, device=CUDA), dim=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = decoder.training_loss(images, embed)["loss"]
    loss.backward()
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in decoder.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


class EmbeddingPairs(torch.utils.data.Dataset):
    """What the prior trains on: text embeddings, token states and a fixed map of them to image embeddings."""

    def __init__(self, space):
        self.space = space

    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        text = F.normalize(torch.randn(self.space.dim, generator=g), dim=0)
        return {"text_embed": text, "image_embed": F.normalize(text.roll(1), dim=0),
                "token_embeds": torch.randn(self.space.text_length, self.space.token_dim, generator=g),
                "mask": torch.arange(self.space.text_length) < 4}


class ImagesWithEmbeddings(torch.utils.data.Dataset):
    def __init__(self, size, dim):
        self.shapes, self.dim = ShapesDataset(length=64, image_size=size), dim

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        embed = F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(i)), dim=0)
        return {"image": self.shapes[i]["image"], "image_embed": embed}


def stage_cases():
    clip, prior, decoder, upsampler = micro_stages()
    space = clip.space
    return space, {
        "clip": (clip, ContrastiveLoss(), ShapesDataset(length=64, image_size=space.image_size)),
        "prior": (prior, lambda m, b: m.training_loss(b), EmbeddingPairs(space)),
        "decoder": (decoder, lambda m, b: m.training_loss(b["image"], b["image_embed"]),
                    ImagesWithEmbeddings(decoder.image_size, space.dim)),
        "upsampler": (upsampler, lambda m, b: m.training_loss(b["image"]),
                      ImagesWithEmbeddings(upsampler.image_size, space.dim)),
    }


@pytest.mark.parametrize("precision", ["auto", "bf16", "no"])
def test_every_stage_trains_on_the_gpu_and_its_checkpoint_loads_on_the_cpu(tmp_path, precision):
    space, cases = stage_cases()
    for name, (model, loss_fn, data) in cases.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        config = TrainerConfig(max_steps=4, batch_size=4, lr=1e-3, warmup_steps=1, mixed_precision=precision,
                               ema_update_after_step=0, checkpoint_every=0, log_every=2, progress=False)
        trainer = Trainer(model, loss_fn, data, config, tmp_path / name, stage=name,
                          space_fn=lambda _: None if name == "upsampler" else space)
        result = trainer.fit()
        assert trainer.accelerator.device.type == "cuda"
        assert all(p.device.type == "cuda" for p in trainer.model.parameters()), name
        # the micro stages' steps are far below a TFLOP: auto trains them in fp32
        assert trainer.accelerator.mixed_precision == ("no" if precision == "auto" else precision), name
        assert result.step == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history), name
        assert ("mfu" in result.history[-1]) == (device_peak(CUDA) is not None), name  # counted, on a known GPU
        loaded = load_stage(result.checkpoint, stage=name)  # map_location: the CPU
        ema = trainer.ema.ema_model.state_dict()
        for key, value in loaded.model.state_dict().items():
            assert value.device.type == "cpu" and torch.equal(value, ema[key].cpu()), (name, key)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_stage_saved_from_the_gpu_loads_on_the_cpu(tmp_path):
    clip, _, decoder, _ = micro_stages()
    decoder.to(CUDA)
    path = save_stage(tmp_path / "decoder", decoder, stage="decoder", space=clip.space)
    loaded = load_stage(path, stage="decoder")
    for (key, value), (_, saved) in zip(loaded.model.state_dict().items(), decoder.state_dict().items()):
        assert value.device.type == "cpu" and torch.equal(value, saved.cpu()), key


@pytest.mark.parametrize("kind", ["blur", "bsr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_upsamplers_degradations_stay_on_the_gpu_and_repeat_with_a_gpu_generator(kind, dtype):
    from unclip.decoder.degradation import degrade

    data = ShapesDataset(split="val", length=8, image_size=32)
    images = torch.stack([data[i]["image"] for i in range(8)]).to(CUDA, dtype)
    first = degrade(images, kind, torch.Generator(device=CUDA).manual_seed(0))
    assert first.device.type == "cuda" and first.dtype == dtype and first.shape == images.shape
    assert first.min() >= -1 and first.max() <= 1 and not torch.equal(first, images)
    again = degrade(images, kind, torch.Generator(device=CUDA).manual_seed(0))
    assert (again.float() - first.float()).abs().mean() < 1e-3  # the same draws (a kernel may round differently)


def sample_all(stages, text, graphs: str, precision: str):
    clip, prior, decoder, upsampler = stages
    g = torch.Generator(device=CUDA).manual_seed(0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        embed = prior.sample(text, steps=8, guidance_scale=2.0, num_candidates=1, generator=g, cuda_graphs=graphs)
        images = decoder.sample(embed, text, steps=8, guidance_scale=3.0, generator=g, cuda_graphs=graphs)
        up = upsampler.sample(images, steps=8, generator=g, cuda_graphs=graphs)
        ddpm = decoder.sample(embed, text, steps=8, sampler="ddpm", generator=g, cuda_graphs=graphs)
        dpmpp = {name: decoder.sample(embed, text, steps=8, sampler=name, spacing="logsnr", generator=g,
                                      cuda_graphs=graphs) for name in ("dpmpp_2m", "dpmpp_2s")}
    return {"prior": embed, "decoder": images, "upsampler": up, "decoder ddpm": ddpm,
            **{f"decoder {name}": out for name, out in dpmpp.items()}}


@pytest.mark.parametrize("precision, atol", [("fp32", 2e-3), ("bf16", 3e-2)])
def test_sampling_replayed_from_cuda_graphs_gives_the_eager_samples(monkeypatch, precision, atol):
    captured = []
    capture = graphs_module.GraphedStep._capture
    monkeypatch.setattr(graphs_module.GraphedStep, "_capture", lambda self: (captured.append(1), capture(self))[1])
    stages = on_cuda(*micro_stages())
    text = stages[0].encode_text(["a red circle", "a blue square"])
    eager = sample_all(stages, text, "off", precision)
    assert not captured
    graphed = sample_all(stages, text, "on", precision)
    assert len(captured) == 6  # prior, decoder, upsampler, decoder with DDPM, 2M, 2S: each captured once, replayed
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    auto = sample_all(stages, text, "auto", precision)  # auto is on for CUDA
    assert len(captured) == 12
    torch.testing.assert_close(auto["decoder"], graphed["decoder"], rtol=0, atol=atol)


def test_a_step_that_reads_back_from_the_gpu_falls_back_with_a_warning():
    diffusion = GaussianDiffusion(100, "cosine", "eps")

    def reads_back(x, t):
        return 0.1 * x / max(float(x.abs().max()), 1.0)  # float(tensor): a host sync, which a graph cannot hold

    x_T = torch.randn(2, 4, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(0))
    eager = sample_ddim(reads_back, diffusion, x_T, steps=6, cuda_graphs="off")
    with pytest.warns(UserWarning, match="could not capture the sampling step in a CUDA graph"):
        fallback = sample_ddim(reads_back, diffusion, x_T, steps=6, cuda_graphs="on")
    torch.testing.assert_close(fallback, eager)
    assert torch.ones(1, device=CUDA).sum().item() == 1  # the GPU is fine afterwards
    _, _, decoder, _ = on_cuda(*micro_stages())
    embed = F.normalize(torch.randn(1, decoder.image_embed_dim, device=CUDA), dim=-1)
    assert torch.isfinite(decoder.sample(embed, steps=6, cuda_graphs="on")).all()  # and graphs work again


def test_graphed_sampling_gives_its_memory_back():
    _, _, decoder, _ = on_cuda(*micro_stages())
    embed = F.normalize(torch.randn(2, decoder.image_embed_dim, device=CUDA), dim=-1)

    def allocated_after(calls: int) -> int:
        for _ in range(calls):
            decoder.sample(embed, steps=6, cuda_graphs="on")
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    first = allocated_after(1)
    assert allocated_after(5) <= first  # the graphs, their static buffers and the warm-up stream's blocks go


def test_flops_are_counted_the_same_on_the_gpu_as_on_the_cpu():
    _, prior, _, _ = micro_stages()
    batch = {k: v[None].repeat(4, *[1] * v.ndim) for k, v in EmbeddingPairs(micro_stages()[0].space)[0].items()}
    _, on_cpu = count_flops(lambda: prior.training_loss(batch)["loss"].backward())
    prior.to(CUDA)
    _, on_gpu = count_flops(lambda: prior.training_loss({k: v.to(CUDA) for k, v in batch.items()})["loss"].backward())
    assert on_gpu == on_cpu > 0


def run_bench(script, *flags):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *flags], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_benchmarks_measure_graphed_and_eager_sampling_and_the_mfu_on_the_gpu():
    out = run_bench("prior.py", "--quick", "--device", "cuda", "--width", "64", "--embed-dim", "64", "--token-dim",
                    "64", "--heads", "2", "--depth", "2", "--batch", "4", "--peak-tflops", "h100-sxm")
    result = out["runs"][0]["results"]["bf16"]
    assert result["sample_guided_s"] > 0 and result["sample_guided_eager_s"] > 0 and result["train_flops"] > 0
    assert out["config"]["peak"]["bf16"] == 989.4 and out["runs"][0]["default_precision"] == "fp32"
