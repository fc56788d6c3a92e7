"""UnCLIPPipeline: CLIP -> prior -> decoder -> upsamplers, composed from stage checkpoints.

    pipe = UnCLIPPipeline.from_pretrained("outputs/demo/pipeline")
    images = pipe.generate(["a red circle", "a purple triangle at the top"], seed=0)

Every call takes a seed and gives the same images for it. Stages from different CLIP embedding spaces
refuse to compose, naming both fingerprints.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from unclip.checkpoint import (
    LoadedStage,
    load_stage,
    resolve_checkpoint,
    write_json_atomic,
)
from unclip.diffusion.graphs import check_cuda_graphs
from unclip.embedding import EmbeddingSpace, TextCondition
from unclip.images import from_pil, to_pil
from unclip.weights import CheckpointError

PIPELINE_FILE = "pipeline.json"


@dataclass
class GenerationSettings:
    prior_steps: int = 64
    prior_guidance: float = 1.0
    prior_candidates: int = 2
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    decoder_eta: float = 0.0
    upsampler_steps: int = 25
    upsampler_aug_level: float = 0.05
    cuda_graphs: str = "auto"  # every sampling loop replayed from a CUDA graph on CUDA (unclip.diffusion.graphs)

    def check(self) -> None:
        self.cuda_graphs = check_cuda_graphs(self.cuda_graphs)
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "prior_candidates"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("prior_guidance", "decoder_guidance", "decoder_eta", "upsampler_aug_level"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors [.., D]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return F.normalize((torch.sin((1 - weight) * omega) / so) * a + (torch.sin(weight * omega) / so) * b, dim=-1)


@dataclass
class UnCLIPPipeline:
    clip: torch.nn.Module
    prior: torch.nn.Module
    decoder: torch.nn.Module
    upsamplers: list = field(default_factory=list)
    spaces: dict = field(default_factory=dict)  # stage name -> EmbeddingSpace (as recorded in its checkpoint)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    sources: dict = field(default_factory=dict)  # stage name -> checkpoint directory

    def __post_init__(self) -> None:
        clip_space: EmbeddingSpace = self.spaces.get("clip") or self.clip.space
        for stage in ("prior", "decoder"):
            space = self.spaces.get(stage)
            if space is not None:
                clip_space.check_same(space, "the CLIP", f"the {stage}")
        for stage in [s for s in self.spaces if s.startswith("upsampler")]:
            if self.spaces[stage] is not None:
                clip_space.check_same(self.spaces[stage], "the CLIP", f"the {stage}")
        size = self.decoder.image_size
        for i, upsampler in enumerate(self.upsamplers):
            if upsampler.low_res_size != size:
                raise ValueError(
                    f"upsampler {i} takes {upsampler.low_res_size}-px images but the stage before it makes {size}-px ones"
                )
            size = upsampler.image_size
        for module in self.modules():
            module.eval().requires_grad_(False)

    # -- construction -----------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.prior, self.decoder, *self.upsamplers]

    @property
    def device(self) -> torch.device:
        return self.clip._mean.device if hasattr(self.clip, "_mean") else next(self.clip.parameters()).device

    def to(self, device) -> "UnCLIPPipeline":
        for module in self.modules():
            module.to(device)
        return self

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        clip: str | Path | None = None,
        prior: str | Path | None = None,
        decoder: str | Path | None = None,
        upsamplers: Sequence[str | Path] = (),
        device: str | torch.device | None = None,
        use_ema: bool = True,
    ) -> "UnCLIPPipeline":
        """From one saved pipeline directory, or from stage checkpoints (directories or run directories)."""
        settings = GenerationSettings()
        if path is not None:
            path = Path(path)
            manifest_file = path / PIPELINE_FILE
            if not manifest_file.is_file():
                raise CheckpointError(f"{path} is not a saved pipeline: {PIPELINE_FILE} is missing")
            manifest = json.loads(manifest_file.read_text())
            stages = manifest["stages"]
            for name in ("clip", "prior", "decoder"):
                if name not in stages:
                    raise CheckpointError(f"{manifest_file} lists no {name} stage")
                if not (path / stages[name]).exists():
                    raise CheckpointError(f"pipeline {path} is missing its {name} stage ({path / stages[name]})")
            clip, prior, decoder = (path / stages[n] for n in ("clip", "prior", "decoder"))
            upsamplers = [path / p for p in stages.get("upsamplers", [])]
            settings = GenerationSettings(**manifest.get("settings", {}))
        missing = [name for name, value in (("clip", clip), ("prior", prior), ("decoder", decoder)) if value is None]
        if missing:
            raise ValueError(f"from_pretrained needs a pipeline directory or the stages {missing}")
        loaded: dict[str, LoadedStage] = {
            "clip": load_stage(clip, stage="clip", use_ema=use_ema),
            "prior": load_stage(prior, stage="prior", use_ema=use_ema),
            "decoder": load_stage(decoder, stage="decoder", use_ema=use_ema),
        }
        ups = [load_stage(p, stage="upsampler", use_ema=use_ema) for p in upsamplers]
        spaces = {name: stage.space for name, stage in loaded.items()}
        pipe = cls(
            clip=loaded["clip"].model,
            prior=loaded["prior"].model,
            decoder=loaded["decoder"].model,
            upsamplers=[u.model for u in ups],
            spaces=spaces,
            settings=settings,
            sources={**{n: s.path for n, s in loaded.items()}, **{f"upsampler_{i}": u.path for i, u in enumerate(ups)}},
        )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return pipe.to(device)

    @classmethod
    def from_config(cls, spec: dict, **kwargs) -> "UnCLIPPipeline":
        """From a ``conf/pipeline/`` node: ``path`` (a saved pipeline) or ``clip``/``prior``/``decoder``/``upsamplers``
        stage checkpoints, and ``settings`` (GenerationSettings overrides)."""
        if spec.get("path"):
            pipe = cls.from_pretrained(spec["path"], **kwargs)
        else:
            pipe = cls.from_pretrained(
                clip=spec.get("clip"), prior=spec.get("prior"), decoder=spec.get("decoder"),
                upsamplers=spec.get("upsamplers") or [], **kwargs,
            )
        pipe.settings = pipe._settings(spec.get("settings") or {})
        return pipe

    def save_pretrained(self, directory: str | Path) -> Path:
        """Copy every stage (weights, config, space) into one directory with a pipeline.json."""
        directory = Path(directory)
        if not self.sources:
            raise ValueError("save_pretrained needs a pipeline built by from_pretrained (stage checkpoints to copy)")
        tmp = directory.with_name(f".tmp-{directory.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stages: dict = {"upsamplers": []}
        for name, source in self.sources.items():
            source = resolve_checkpoint(source)
            target = tmp / name
            target.mkdir()
            for file in ("model.safetensors", "ema.safetensors", "config.json", "space.json"):
                if (source / file).is_file():
                    shutil.copy2(source / file, target / file)
            if name.startswith("upsampler"):
                stages["upsamplers"].append(name)
            else:
                stages[name] = name
        write_json_atomic(tmp / PIPELINE_FILE, {"format": 1, "stages": stages, "settings": vars(self.settings)})
        if directory.exists():
            shutil.rmtree(directory)
        tmp.replace(directory)
        return directory

    # -- the steps ---------------------------------------------------------------------------
    def _generator(self, seed: int) -> torch.Generator:
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return torch.Generator(device=self.device).manual_seed(seed)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type in ("cpu", "cuda"))

    def _check_prompts(self, prompts: Sequence[str] | str) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty; give at least one prompt")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {prompt!r}")
        return prompts

    def _decode(self, image_embed, text: TextCondition | None, settings: GenerationSettings, generator, noise=None, eta=None):
        images = self.decoder.sample(
            image_embed, text, steps=settings.decoder_steps, guidance_scale=settings.decoder_guidance,
            eta=settings.decoder_eta if eta is None else eta, generator=generator, noise=noise,
            cuda_graphs=settings.cuda_graphs,
        )
        for upsampler in self.upsamplers:
            images = upsampler.sample(
                images, steps=settings.upsampler_steps, aug_level=settings.upsampler_aug_level, generator=generator,
                cuda_graphs=settings.cuda_graphs,
            )
        return images

    def _settings(self, overrides: dict) -> GenerationSettings:
        unknown = set(overrides) - set(vars(self.settings))
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(vars(self.settings))}")
        settings = GenerationSettings(**{**vars(self.settings), **overrides})
        settings.check()
        return settings

    def _images_in(self, image) -> torch.Tensor:
        """A PIL image (any mode or size) or a [-1, 1] tensor -> [1, 3, S, S] at the CLIP's size."""
        if isinstance(image, Image.Image):
            return from_pil(image, self.clip.space.image_size).to(self.device)
        if isinstance(image, torch.Tensor):
            if image.ndim == 3:
                image = image[None]
            return image.to(self.device)
        raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")

    # -- public API ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | str,
        num_images_per_prompt: int = 1,
        *,
        seed: int = 0,
        rerank: int = 1,
        output: str = "pil",
        **settings,
    ):
        """Text -> images: ``num_images_per_prompt`` per prompt, in prompt order. ``rerank=k`` draws k candidates
        per image and keeps the one the CLIP finds most similar to the prompt."""
        prompts = self._check_prompts(prompts)
        if num_images_per_prompt < 1 or rerank < 1:
            raise ValueError(f"num_images_per_prompt and rerank must be >= 1, got {num_images_per_prompt}, {rerank}")
        config = self._settings(settings)
        generator = self._generator(seed)
        copies = num_images_per_prompt * rerank
        with self._autocast():
            text = self.clip.encode_text(prompts).repeat_interleave(copies)
            image_embed = self.prior.sample(
                text, steps=config.prior_steps, guidance_scale=config.prior_guidance,
                num_candidates=config.prior_candidates, generator=generator, cuda_graphs=config.cuda_graphs,
            )
            images = self._decode(image_embed, text, config, generator).float()
            if rerank > 1:
                scores = (self.clip.encode_image(images) * text.embed.float()).sum(-1)
                scores = scores.view(len(prompts) * num_images_per_prompt, rerank)
                best = scores.argmax(dim=1) + torch.arange(0, len(scores) * rerank, rerank, device=scores.device)
                images = images[best]
        return to_pil(images) if output == "pil" else images

    @torch.no_grad()
    def variations(self, image, n: int = 4, *, seed: int = 0, eta: float = 1.0, output: str = "pil", **settings):
        """``n`` images sharing the CLIP image embedding of ``image``, decoded with fresh noise (DDIM eta > 0)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        config = self._settings(settings)
        generator = self._generator(seed)
        with self._autocast():
            embed = self.clip.encode_image(self._images_in(image)).float().repeat(n, 1)
            images = self._decode(embed, None, config, generator, eta=eta).float()
        return to_pil(images) if output == "pil" else images

    @torch.no_grad()
    def interpolate(self, image_a, image_b, steps: int = 5, *, seed: int = 0, output: str = "pil", **settings):
        """Decode ``steps`` slerps between the two images' embeddings, all with one fixed noise."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
        config = self._settings(settings)
        generator = self._generator(seed)
        with self._autocast():
            a = self.clip.encode_image(self._images_in(image_a)).float()
            b = self.clip.encode_image(self._images_in(image_b)).float()
            embeds = torch.cat([slerp(a, b, w / (steps - 1)) for w in range(steps)])
            size = self.decoder.image_size
            noise = torch.randn(1, 3, size, size, device=self.device, generator=generator).repeat(steps, 1, 1, 1)
            images = self._decode(embeds, None, config, generator, noise=noise, eta=0.0).float()
        return to_pil(images) if output == "pil" else images

    @torch.no_grad()
    def text_diff(
        self, image, from_text: str, to_text: str, amounts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        *, seed: int = 0, output: str = "pil", **settings,
    ):
        """Move the image embedding along the normalised difference of two text embeddings (paper, 3.3):
        slerp(z_i, z_d, amount) with z_d = normalise(z_t(to) - z_t(from)); one fixed noise."""
        self._check_prompts([from_text, to_text])
        config = self._settings(settings)
        generator = self._generator(seed)
        with self._autocast():
            z_i = self.clip.encode_image(self._images_in(image)).float()
            texts = self.clip.encode_text([from_text, to_text]).embed.float()
            z_d = F.normalize(texts[1] - texts[0], dim=-1)[None]
            embeds = torch.cat([slerp(z_i, z_d, float(a)) for a in amounts])
            size = self.decoder.image_size
            noise = torch.randn(1, 3, size, size, device=self.device, generator=generator).repeat(len(embeds), 1, 1, 1)
            images = self._decode(embeds, None, config, generator, noise=noise, eta=0.0).float()
        return to_pil(images) if output == "pil" else images
