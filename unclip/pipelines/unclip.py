"""UnCLIPPipeline: CLIP -> prior -> decoder -> upsamplers, composed from stage checkpoints.

    pipe = UnCLIPPipeline.from_pretrained("outputs/demo/pipeline")
    images = pipe.generate(["a red circle", "a purple triangle at the top"], seed=0)
    pipe.inpaint(image, mask, "a blue square")          # mask: white = paint here, black = keep
    pipe.img2img(image, "a green circle", strength=0.6)
    pipe.mix([(image, 0.5), ("a blue square", 0.5)])
    pipe.generate("a circle", negative_prompt="red")
    pipe.unconditional(16, seed=0)                      # no prompt: the prior's null, the decoder's null caption
    pipe.unconditional(16, rerank=8, captions=training_captions)  # best of 8 by a caption bank

Every call takes a seed and gives the same images for it. Stages from different CLIP embedding spaces
refuse to compose, naming both fingerprints. Each public method is a few lines over the shared steps: encode
(text, images), the prior, the decoder, the upsamplers; what every pipeline shares is in ``unclip.pipelines.base``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F

from unclip.checkpoint import LoadedStage, load_stage
from unclip.diffusion import SAMPLERS, SPACINGS, Inpainting, strength_skip
from unclip.diffusion.dpm_solver import ORDER
from unclip.diffusion.graphs import check_cuda_graphs
from unclip.diffusion.samplers import ODE_SOLVERS
from unclip.diffusion.sampling import check_eta
from unclip.embedding import EmbeddingSpace, TextCondition
from unclip.images import resize
from unclip.masks import fill_colour, keep_at
from unclip.pipeline_inputs import (
    check_amounts,
    check_count,
    check_finite,
    check_mix,
    check_trained_null,
    images_in,
    keep_masks,
    prompts_for,
    unit_embeds,
)
from unclip.pipelines.base import Pipeline, bank_similarity, group_best, in_chunks, read_pipeline_file

# RePaint's resampling passes a step when inpainting with a plain decoder (an inpainting decoder needs none).
DEFAULT_JUMPS = 3


@dataclass
class GenerationSettings:
    prior_steps: int = 64
    prior_guidance: float = 1.0
    prior_candidates: int = 2
    decoder_steps: int = 50
    decoder_guidance: float = 3.0
    decoder_eta: float = 0.0
    upsampler_steps: Any = 25  # an int for every upsampler, or a list: the i-th upsampler's steps (a cascade's later
    upsampler_aug_level: Any = 0.05  # stages need fewer steps: DALL-E 2 used 27 and 15); a float or a list
    # How each stage takes its steps (unclip.diffusion.samplers): "ddim" (the default, with decoder_eta), "ddpm",
    # "dpmpp_2m" or "dpmpp_2s" (DPM-Solver++, second order: fewer steps for the same image; no eta, steps >= 2);
    # and which timesteps: "uniform" in t (the default), "logsnr" or "karras". The upsamplers' take one value for
    # all or a list, one per upsampler, as upsampler_steps. Inpainting (RePaint) needs "ddim" or "ddpm" (an
    # inpainting decoder without jumps takes any).
    prior_sampler: str = "ddim"
    prior_spacing: str = "uniform"
    decoder_sampler: str = "ddim"
    decoder_spacing: str = "uniform"
    upsampler_sampler: Any = "ddim"
    upsampler_spacing: Any = "uniform"
    rerank: int = 1  # CLIP re-ranking: generate draws this many candidates (prior and decoder) per image and keeps the
                     # one the CLIP finds most similar to the prompt, ranked at the decoder's size (only it upsampled)
    cuda_graphs: str = "auto"  # every sampling loop replayed from a CUDA graph on CUDA (unclip.diffusion.graphs)
    max_batch: int = 64  # images a stage makes at once: every call makes more in chunks of this many

    def check(self) -> None:
        self.cuda_graphs = check_cuda_graphs(self.cuda_graphs)
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "prior_candidates", "rerank", "max_batch"):
            for value in per_stage(getattr(self, name), name):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("prior_guidance", "decoder_guidance", "decoder_eta", "upsampler_aug_level"):
            for value in per_stage(getattr(self, name), name):
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        self._check_samplers()

    def _check_samplers(self) -> None:
        """Each stage's sampler and spacing are known ones, and its sampler can take its steps (and eta)."""
        for stage in SAMPLED_STAGES:
            for key, choices in (("sampler", SAMPLERS), ("spacing", SPACINGS)):
                name = f"{stage}_{key}"
                if any(value not in choices for value in per_stage(getattr(self, name), name)):
                    raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
            samplers = per_stage(getattr(self, f"{stage}_sampler"), f"{stage}_sampler")
            steps = per_stage(getattr(self, f"{stage}_steps"), f"{stage}_steps")
            for sampler, count in zip(samplers * (len(steps) if len(samplers) == 1 else 1),
                                      steps * (len(samplers) if len(steps) == 1 else 1)):
                if sampler in ODE_SOLVERS and count < ORDER:
                    raise ValueError(f"{stage}_sampler={sampler!r} is a second-order solver and needs {stage}_steps >= "
                                     f"{ORDER}, got {count}; give more steps or {stage}_sampler='ddim'")
        if self.decoder_sampler in ODE_SOLVERS and self.decoder_eta != 0:
            raise ValueError(f"decoder_sampler={self.decoder_sampler!r} is a deterministic ODE solver and takes no "
                             f"eta, got decoder_eta={self.decoder_eta!r}: set decoder_eta=0 or decoder_sampler='ddim'")

    def for_upsampler(self, name: str, index: int, count: int):
        """The setting ``name`` (one of ``PER_UPSAMPLER``) for upsampler ``index`` of ``count``."""
        value = getattr(self, name)
        if not isinstance(value, (list, tuple)):
            return value
        if len(value) < count:
            raise ValueError(f"{name}={list(value)} has {len(value)} entries but the pipeline has {count} "
                             f"upsamplers: give one value for all or one per upsampler (the i-th for the i-th; "
                             f"entries past the last upsampler are unused)")
        return value[index]


PER_UPSAMPLER = ("upsampler_steps", "upsampler_aug_level", "upsampler_sampler", "upsampler_spacing")
SAMPLED_STAGES = ("prior", "decoder", "upsampler")  # each has <stage>_steps, <stage>_sampler and <stage>_spacing


def per_stage(value, name: str) -> list:
    """A setting's values: the one given, or a per-upsampler list's (only ``PER_UPSAMPLER`` settings take lists)."""
    if isinstance(value, (list, tuple)):
        if name not in PER_UPSAMPLER or not value:
            one = "one name" if name.endswith(("_sampler", "_spacing")) else "one number"
            raise ValueError(f"{name} takes {one}" + (", or one per upsampler" if name in PER_UPSAMPLER else "")
                             + f", got {list(value)!r}")
        return list(value)
    return [value]


def stochastic_eta(eta: float | None, sampler: str) -> float:
    """A call's ``eta`` where it gives one, else the sampler's default for editing: 1 (fresh noise each DDIM step,
    what variations and RePaint want), 0 for an ODE solver (DPM-Solver++), which takes none."""
    if eta is not None:
        return eta
    return 0.0 if sampler in ODE_SOLVERS else 1.0


def check_cascade(decoder_size: int, upsamplers: Sequence[tuple[int, int]]) -> None:
    """An error naming every stage's sizes unless each upsampler takes the size the stage before it makes."""
    size = decoder_size
    for i, (low, high) in enumerate(upsamplers):
        if low != size:
            stages = [f"decoder -> {decoder_size} px", *(f"upsampler {j}: {a} -> {b} px" for j, (a, b) in
                                                       enumerate(upsamplers))]
            raise ValueError(f"the cascade's sizes do not connect: upsampler {i} takes {low}-px images but the stage "
                             f"before it makes {size}-px ones ({'; '.join(stages)}); each upsampler's low_res_size must "
                             f"be the previous stage's image_size")
        size = high


def _rows(embeds, start: int, count: int, total: int):
    """Rows ``start:start + count`` of per-row embeddings [total, D]; anything else (one row, None) as it is."""
    if isinstance(embeds, torch.Tensor) and embeds.ndim == 2 and len(embeds) == total > 1:
        return embeds[start:start + count]
    return embeds


def _chunks(total: int, config: GenerationSettings) -> list[slice]:
    """Rows ``0:total`` in runs of ``config.max_batch``: what one call of a stage makes at once."""
    return [slice(start, min(start + config.max_batch, total)) for start in range(0, total, config.max_batch)]


def _take(rows_of, rows: slice, total: int):
    """``rows_of[rows]`` if it holds a row for each of ``total`` (tensors, captions, an Inpainting's tensors),
    else as it is (None, one row for all)."""
    if isinstance(rows_of, Inpainting):
        return Inpainting(_take(rows_of.known, rows, total), _take(rows_of.keep, rows, total), jumps=rows_of.jumps,
                          jump_length=rows_of.jump_length)
    if isinstance(rows_of, (torch.Tensor, TextCondition)) and len(rows_of) == total:
        return rows_of[rows]
    return rows_of


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors [.., D]."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return F.normalize((torch.sin((1 - weight) * omega) / so) * a + (torch.sin(weight * omega) / so) * b, dim=-1)


@dataclass
class Negative:
    """What guidance steers away from (a negative prompt): the caption for the prior's and the decoder's guidance,
    and the image embedding for the decoder's; [B] rows each, either may be None."""

    text: TextCondition | None = None
    image_embed: torch.Tensor | None = None


@dataclass
class UnCLIPPipeline(Pipeline):
    clip: torch.nn.Module
    prior: torch.nn.Module
    decoder: torch.nn.Module
    upsamplers: list = field(default_factory=list)
    spaces: dict = field(default_factory=dict)  # stage name -> EmbeddingSpace (as recorded in its checkpoint)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    sources: dict = field(default_factory=dict)  # stage name -> checkpoint directory

    generator: ClassVar[str] = "unclip"
    stages: ClassVar[tuple[str, ...]] = ("clip", "prior", "decoder")
    stage_lists: ClassVar[tuple[str, ...]] = ("upsampler",)
    settings_class: ClassVar[type] = GenerationSettings
    operations: ClassVar[frozenset[str]] = frozenset(
        {"generate", "unconditional", "decode", "variations", "img2img", "interpolate", "text_diff", "mix", "inpaint"})
    demo_dir: ClassVar[str] = "demo"
    # without a prompt the prior draws one candidate from its null (nothing to rank by) and has no guidance
    no_prompt_settings: ClassVar[dict[str, object]] = {"prior_candidates": 1, "prior_guidance": 1.0}
    bank_settings: ClassVar[tuple[str, ...]] = ("prior_candidates",)

    def __post_init__(self) -> None:
        clip_space: EmbeddingSpace = self.spaces.get("clip") or self.clip.space
        for stage in ("prior", "decoder"):
            space = self.spaces.get(stage)
            if space is not None:
                clip_space.check_same(space, "the CLIP", f"the {stage}")
        for stage in [s for s in self.spaces if s.startswith("upsampler")]:
            if self.spaces[stage] is not None:
                clip_space.check_same(self.spaces[stage], "the CLIP", f"the {stage}")
        check_cascade(self.decoder.image_size, [(u.low_res_size, u.image_size) for u in self.upsamplers])
        self._check_settings(self.settings)
        for module in self.modules():
            module.eval().requires_grad_(False)

    # -- construction -----------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.prior, self.decoder, *self.upsamplers]

    @property
    def image_size(self) -> int:
        """The side of the images the pipeline makes (its last stage's)."""
        return self.upsamplers[-1].image_size if self.upsamplers else self.decoder.image_size

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
        """From one saved pipeline directory, or from stage checkpoints (directories or run directories). Stages
        given beside a pipeline directory replace its own (e.g. ``decoder=`` an inpainting decoder)."""
        settings = GenerationSettings()
        if path is not None:
            path = Path(path)
            stages, settings = read_pipeline_file(path, cls)
            clip, prior, decoder = (given or path / stages[n] for n, given in
                                    (("clip", clip), ("prior", prior), ("decoder", decoder)))
            upsamplers = list(upsamplers) or [path / p for p in stages.get("upsamplers", [])]
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
    def stage_spec(cls, spec: dict) -> dict:
        """``clip``/``prior``/``decoder``/``upsamplers`` of a ``conf/pipeline/`` node."""
        return {**super().stage_spec(spec), "upsamplers": spec.get("upsamplers") or []}

    # -- the shared steps ----------------------------------------------------------------------
    @contextmanager
    def _session(self, seed: int, overrides: dict, output: str = "pil", prepared: tuple | None = None
                 ) -> Iterator[tuple[GenerationSettings, torch.Generator]]:
        """One call's settings (defaults + ``overrides``, checked) and generator, under autocast; ``output`` is
        checked before any work (``prepared``: what ``_prepare`` gave, where the call checked it earlier)."""
        config, generator = prepared or self._prepare(seed, overrides, output)
        with self.autocast():
            yield config, generator

    def _images_in(self, image, size: int | None = None) -> torch.Tensor:
        """Images in at ``size`` (PIL at the CLIP's size and tensors as they are without one), on the device."""
        if size is None:
            return images_in(image, self.clip.space.image_size, self.device, resize_tensors=False)
        return images_in(image, size, self.device)

    def _prior(self, text: TextCondition, config: GenerationSettings, generator, negative: Negative | None = None):
        """Image embeddings for captions, ``config.max_batch`` rows at a time."""
        negative_text = None if negative is None else negative.text
        return torch.cat([self.prior.sample(
            text[rows], steps=config.prior_steps, guidance_scale=config.prior_guidance,
            num_candidates=config.prior_candidates, generator=generator, cuda_graphs=config.cuda_graphs,
            sampler=config.prior_sampler, spacing=config.prior_spacing,
            **({"negative": _take(negative_text, rows, len(text))} if negative_text is not None else {}),
        ) for rows in _chunks(len(text), config)])

    def _negative(self, prompt: str | None, image_embed, count: int, config: GenerationSettings,
                  seed: int) -> Negative | None:
        """The negative for ``count`` rows: a prompt's caption and (unless ``image_embed`` is given) its image
        embedding from the prior, drawn from a stream of its own so that the other draws do not move."""
        if prompt is None and image_embed is None:
            return None
        text = (None if prompt is None else
                self._encode_text(self._check_prompts(prompt, "negative_prompt"), config.max_batch))
        if image_embed is not None:
            embed = unit_embeds(image_embed, count, self.clip.space.dim, self.device, "negative_image_embed")
        else:
            embed = self._prior(text, config, self._generator(seed)).float().expand(count, -1)
        return Negative(None if text is None else text.repeat_interleave(count), embed)

    def _check_negative(self, prompt, image_embed, count: int) -> None:
        """A call's negative prompt and image embedding (for ``count`` images), checked before any work."""
        if prompt is not None:
            self._check_prompts(prompt, "negative_prompt")
        if image_embed is not None:
            unit_embeds(image_embed, count, self.clip.space.dim, self.device, "negative_image_embed")

    def _decode(self, image_embed, text: TextCondition | None, config: GenerationSettings, generator, *, noise=None,
                eta=None, negative: Negative | None = None, inpaint: Inpainting | None = None, init=None,
                strength: float = 1.0) -> torch.Tensor:
        """The decoder: images at its size, ``config.max_batch`` at a time. An inpainting decoder asked for no
        inpainting fills everything."""
        fills_all = getattr(self.decoder, "inpaints", False) and inpaint is None
        if fills_all and init is not None:
            raise ValueError("img2img and strength < 1 need a plain decoder; this pipeline's decoder inpaints")
        total, size, parts = len(image_embed), self.decoder.image_size, []
        for rows in _chunks(total, config):
            part = _take(inpaint, rows, total)
            if fills_all:
                blank = torch.zeros(len(image_embed[rows]), 3, size, size, device=self.device)
                part = Inpainting(blank, blank[:, :1])
            parts.append(self.decoder.sample(
                image_embed[rows], _take(text, rows, total), steps=config.decoder_steps,
                guidance_scale=config.decoder_guidance, eta=config.decoder_eta if eta is None else eta,
                generator=generator, noise=_take(noise, rows, total), inpaint=part,
                negative_embed=None if negative is None else _take(negative.image_embed, rows, total),
                negative_text=None if negative is None else _take(negative.text, rows, total),
                cuda_graphs=config.cuda_graphs, sampler=config.decoder_sampler, spacing=config.decoder_spacing,
                **({"init_image": _take(init, rows, total), "strength": strength} if init is not None else {}),
            ))
        return torch.cat(parts)

    def _upsample(self, images: torch.Tensor, config: GenerationSettings, generator, *, known=None, keep=None,
                  eta: float | None = 0.0) -> torch.Tensor:
        """The upsamplers in turn, ``config.max_batch`` images at a time; with ``known``/``keep`` (at the last
        stage's size) each inpaints too, keeping the known image (resized to its size) where the mask (resized with
        ``keep_at``) keeps it."""
        for index, upsampler in enumerate(self.upsamplers):
            size, total, parts = upsampler.image_size, len(images), []
            run = {name.removeprefix("upsampler_"): config.for_upsampler(name, index, len(self.upsamplers))
                   for name in PER_UPSAMPLER}  # steps, aug_level, sampler, spacing
            for rows in _chunks(total, config):
                inpaint = None if known is None else Inpainting(resize(known[rows], size), keep_at(keep[rows], size))
                parts.append(upsampler.sample(images[rows], generator=generator, inpaint=inpaint,
                                              eta=stochastic_eta(eta, run["sampler"]) if known is not None else 0.0,
                                              cuda_graphs=config.cuda_graphs,
                                              **run))
            images = torch.cat(parts)
        return images

    def _check_settings(self, settings: GenerationSettings) -> None:
        settings.check()
        for name in PER_UPSAMPLER:
            settings.for_upsampler(name, 0, len(self.upsamplers))

    def _render(self, image_embed, text, config, generator, **decode) -> torch.Tensor:
        """Decoder, then upsamplers (no inpainting)."""
        return self._upsample(self._decode(image_embed, text, config, generator, **decode), config, generator)

    # -- text to image, image embeddings to images ------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | str,
        num_images_per_prompt: int = 1,
        *,
        seed: int = 0,
        rerank: int | None = None,
        negative_prompt: str | None = None,
        negative_image_embed: torch.Tensor | None = None,
        output: str = "pil",
        **settings,
    ):
        """Text -> images: ``num_images_per_prompt`` per prompt, in prompt order, made ``settings.max_batch`` at a
        time (a larger request runs in chunks; its first chunk's images are those of a request for only them).
        ``rerank=k`` (None: the settings' ``rerank``) draws k candidates per image, prior and decoder, and keeps the
        one the CLIP finds most similar to the prompt; candidates are ranked at the decoder's size, so only the kept
        ones are upsampled. ``negative_prompt`` (and/or ``negative_image_embed``) is what guidance steers away from:
        the prior's (when ``prior_guidance != 1``) and the decoder's unconditional branch."""
        prompts = self._check_prompts(prompts)
        count = check_count("num_images_per_prompt", num_images_per_prompt)
        if rerank is not None:
            settings = {**settings, "rerank": check_count("rerank", rerank)}
        prepared = self._prepare(seed, settings, output)
        rows = len(prompts) * count * prepared[0].rerank  # candidates
        self._check_negative(negative_prompt, negative_image_embed, rows)
        with self._session(seed, settings, output, prepared) as (config, generator):
            def draw(text: TextCondition, start: int) -> torch.Tensor:
                negative = self._negative(negative_prompt, _rows(negative_image_embed, start, len(text), rows),
                                          len(text), config, seed)
                image_embed = self._prior(text, config, generator, negative)
                return self._decode(image_embed, text, config, generator, negative=negative)

            return self._ranked_images(prompts, count, config, output, draw,
                                       lambda images: self._upsample(images, config, generator))

    def _check_unconditional(self) -> None:
        if not hasattr(self.prior, "sample_unconditional"):
            raise ValueError(f"the prior ({type(self.prior).__name__}) cannot sample without a prompt (the passthrough "
                             "prior's image embedding is the prompt's text embedding); use a diffusion prior trained "
                             "with caption dropout (cond_drop_prob > 0)")
        getattr(self.prior, "check_unconditional", lambda: None)()
        check_trained_null("decoder", "caption_drop_prob", getattr(self.decoder, "caption_drop_prob", 1), 0.5)

    def _unconditional_candidates(self, count: int, config: GenerationSettings, generator,
                                  bank: torch.Tensor | None) -> torch.Tensor:
        """The prior from its learned null, then the decoder with the null caption (its guidance on the sampled
        image embedding). With a caption bank, each embedding is the best of ``prior_candidates`` prior samples by
        its similarity to its best-matching caption (DALL-E 2's prior candidates, the bank standing in for the
        prompt; the pipeline's own prior_candidates are for prompts and not used here)."""
        m = config.prior_candidates if bank is not None else 1
        embeds = self.prior.sample_unconditional(
            count * m, steps=config.prior_steps, generator=generator, cuda_graphs=config.cuda_graphs,
            sampler=config.prior_sampler, spacing=config.prior_spacing)
        if m > 1:
            embeds = embeds[group_best(bank_similarity(embeds, bank), m)]
        return self._decode(embeds, None, config, generator)

    def _unconditional_finish(self, images: torch.Tensor, config: GenerationSettings, generator) -> torch.Tensor:
        return self._upsample(images, config, generator)

    @torch.no_grad()
    def decode(self, image_embeds: torch.Tensor, *, seed: int = 0, eta: float = 0.0, output: str = "pil", **settings):
        """Images for CLIP image embeddings [N, D] (unit norm): the decoder and the upsamplers, no caption."""
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2 or len(image_embeds) == 0:
            raise ValueError(f"image_embeds must be a non-empty tensor [N, D], got {getattr(image_embeds, 'shape', image_embeds)!r}")
        check_finite(image_embeds, "image_embeds")
        with self._session(seed, settings, output) as (config, generator):
            images = self._render(image_embeds.to(self.device).float(), None, config, generator, eta=eta)
        return self._output(images, output)

    # -- images to images -----------------------------------------------------------------------
    @torch.no_grad()
    def variations(self, image, n: int = 4, *, seed: int = 0, eta: float | None = None, strength: float = 1.0,
                   negative_prompt: str | None = None, negative_image_embed: torch.Tensor | None = None,
                   output: str = "pil", **settings):
        """``n`` images sharing the CLIP image embedding of ``image``, decoded with fresh noise (``eta``: DDIM's, default
        1; a DPM-Solver++ decoder takes none, its variations differ by their starting noise alone). ``strength < 1``
        starts from the image itself noised that far (1: from pure noise; 0: the image)."""
        check_count("n", n)
        strength_skip(1, strength)  # checks it
        with self._session(seed, settings, output) as (config, generator):
            embed = self.clip.encode_image(self._images_in(image)).float().repeat(n, 1)
            negative = self._negative(negative_prompt, negative_image_embed, n, config, seed)
            init = None if strength == 1 else self._images_in(image, self.decoder.image_size)[:1].repeat(n, 1, 1, 1)
            images = self._render(embed, None, config, generator, eta=stochastic_eta(eta, config.decoder_sampler),
                                  negative=negative, init=init,
                                  strength=strength)
        return self._output(images, output)

    @torch.no_grad()
    def img2img(self, image, prompt: str | Sequence[str], strength: float = 0.5, *, n: int = 1, seed: int = 0,
                negative_prompt: str | None = None, negative_image_embed: torch.Tensor | None = None,
                output: str = "pil", **settings):
        """Image-to-image (SDEdit): each image noised ``strength`` of the way to pure noise at the decoder's size,
        then denoised towards its prompt's embedding (from the prior); ``n`` per image, in image order. Low strength
        keeps the composition, high strength follows the prompt; 0 returns the images (at the pipeline's size)."""
        strength_skip(1, strength)  # checks it
        check_count("n", n)
        images = self._images_in(image, self.image_size)
        prompts = prompts_for(self._check_prompts(prompt, "prompt"), len(images))
        prepared = self._prepare(seed, settings, output)
        self._check_negative(negative_prompt, negative_image_embed, len(images) * n)
        if strength == 0:
            return self._output(images.repeat_interleave(n, 0), output)
        with self._session(seed, settings, output, prepared) as (config, generator):
            text = self._encode_text(prompts, config.max_batch).repeat_interleave(n)
            negative = self._negative(negative_prompt, negative_image_embed, len(text), config, seed)
            init = resize(images, self.decoder.image_size).repeat_interleave(n, 0)
            image_embed = self._prior(text, config, generator, negative)
            images = self._render(image_embed, text, config, generator, negative=negative, init=init,
                                  strength=strength)
        return self._output(images, output)

    @torch.no_grad()
    def interpolate(self, image_a, image_b, steps: int = 5, *, seed: int = 0, output: str = "pil", **settings):
        """Decode ``steps`` slerps between the two images' embeddings, all with one fixed noise."""
        if check_count("steps", steps) < 2:
            raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
        with self._session(seed, settings, output) as (config, generator):
            a = self.clip.encode_image(self._images_in(image_a)).float()
            b = self.clip.encode_image(self._images_in(image_b)).float()
            embeds = torch.cat([slerp(a, b, w / (steps - 1)) for w in range(steps)])
            images = self._render(embeds, None, config, generator, noise=self._shared_noise(steps, generator), eta=0.0)
        return self._output(images, output)

    @torch.no_grad()
    def text_diff(
        self, image, from_text: str, to_text: str, amounts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        *, seed: int = 0, output: str = "pil", **settings,
    ):
        """Move the image embedding along the normalised difference of two text embeddings (paper, 3.3):
        slerp(z_i, z_d, amount) with z_d = normalise(z_t(to) - z_t(from)); one fixed noise."""
        self._check_prompts([from_text, to_text], "from_text, to_text")
        amounts = check_amounts(amounts)
        with self._session(seed, settings, output) as (config, generator):
            z_i = self.clip.encode_image(self._images_in(image)).float()
            texts = self.clip.encode_text([from_text, to_text]).embed.float()
            z_d = F.normalize(texts[1] - texts[0], dim=-1)[None]
            embeds = torch.cat([slerp(z_i, z_d, a) for a in amounts])
            noise = self._shared_noise(len(embeds), generator)
            images = self._render(embeds, None, config, generator, noise=noise, eta=0.0)
        return self._output(images, output)

    def _shared_noise(self, count: int, generator) -> torch.Tensor:
        size = self.decoder.image_size
        return torch.randn(1, 3, size, size, device=self.device, generator=generator).repeat(count, 1, 1, 1)

    @torch.no_grad()
    def mix(self, items: Sequence[tuple], n: int = 1, *, seed: int = 0, eta: float = 0.0, output: str = "pil",
            **settings):
        """Decode the weighted mix of CLIP image embeddings: ``items`` are ``(image_or_text, weight)`` pairs (an image
        as for ``variations``, a text through the prior); ``sum(weight * embedding)``, normalised. The weights must
        not sum to zero; a weight may be negative (steer away)."""
        items = check_mix(items)
        check_count("n", n)
        for item, _ in items:
            if isinstance(item, str):
                self._check_prompts(item, "mix")
        with self._session(seed, settings, output) as (config, generator):
            embeds = [self._embedding_of(item, config, generator) for item, _ in items]
            mixed = sum(weight * embed for (_, weight), embed in zip(items, embeds))
            norm = float(mixed.norm())
            if not math.isfinite(norm) or not bool(torch.isfinite(mixed).all()):  # it would decode a black image
                raise ValueError(f"the weighted sum of the embeddings overflows (weights {[w for _, w in items]}); "
                                 "give smaller weights (only their ratios matter)")
            if norm < 1e-6:
                raise ValueError("the weighted embeddings cancel out (their sum is zero); change the weights")
            images = self._render(F.normalize(mixed, dim=-1).repeat(n, 1), None, config, generator, eta=eta)
        return self._output(images, output)

    def _embedding_of(self, item, config: GenerationSettings, generator) -> torch.Tensor:
        """[1, D]: a text's through the prior, an image's from the CLIP."""
        if isinstance(item, str):
            return self._prior(self.clip.encode_text([item]), config, generator).float()
        return self.clip.encode_image(self._images_in(item)[:1]).float()

    # -- inpainting ---------------------------------------------------------------------------------
    def _edit_condition(self, prompt, image_embed, images, keep, n, config, generator, negative):
        """(caption or None, image embeddings [B * n, D]) for inpainting: a prompt through the prior; a given image
        embedding (with the prompt, if any, as the decoder's caption); neither: the CLIP embedding of the image
        with the hole filled by the kept pixels' median colour ("more of the surroundings": removes objects)."""
        count = len(images)
        text = (None if prompt is None else
                self._encode_text(prompts_for(prompt, count), config.max_batch).repeat_interleave(n))
        if image_embed is not None:
            return text, unit_embeds(image_embed, count, self.clip.space.dim, self.device).repeat_interleave(n, 0)
        if text is not None:
            return text, self._prior(text, config, generator, negative)
        filled = keep * images + (1 - keep) * fill_colour(images, keep)
        return None, in_chunks(self.clip.encode_image, filled, config.max_batch).float().repeat_interleave(n, 0)

    @torch.no_grad()
    def inpaint(self, image, mask, prompt: str | Sequence[str] | None = None, *, image_embed: torch.Tensor | None = None,
                n: int = 1, jumps: int | None = None, jump_length: int = 1, eta: float | None = None, seed: int = 0,
                negative_prompt: str | None = None, negative_image_embed: torch.Tensor | None = None,
                output: str = "pil", **settings):
        """Fill the white part of ``mask`` in ``image`` (a PIL image, a list of them, or tensors [B, 3, H, W]); keep
        the rest exactly. ``n`` results per image, in image order, at the pipeline's size (the image is resized to
        it, the mask with it). The fill follows ``prompt`` (through the prior) or ``image_embed``; with neither, the
        image's own surroundings (object removal).

        A plain decoder inpaints with RePaint (``jumps`` resampling passes a step, default ``DEFAULT_JUMPS``; each
        costs another model call a step); an inpainting decoder (``inpaint=True``) sees the masked image and needs
        none (default 0). ``eta``: RePaint's DDIM steps' (default 1; an inpainting decoder sampled by DPM-Solver++
        takes none). The upsamplers inpaint too, keeping the image at their size. An all-black mask returns the
        image; an all-white one is plain generation: ``generate(prompt, n)`` or ``decode(image_embed)``."""
        check_count("n", n)
        images = self._images_in(image, self.image_size)
        keep = keep_masks(mask, image, len(images), self.image_size, self.device)
        jumps = (0 if getattr(self.decoder, "inpaints", False) else DEFAULT_JUMPS) if jumps is None else jumps
        self._check_inpaint(prompt, image_embed, len(images), jumps, jump_length, eta)
        prepared = self._prepare(seed, settings, output)
        self._check_negative(negative_prompt, negative_image_embed, len(images) * n)
        if bool((keep == 1).all()):  # nothing to fill
            return self._output(images.repeat_interleave(n, 0), output)
        if bool((keep == 0).all()) and (prompt is not None or image_embed is not None):
            return self._plain(prompt, image_embed, len(images), n, seed, negative_prompt, negative_image_embed,
                               output, settings)
        with self._session(seed, settings, output, prepared) as (config, generator):
            count = len(images) * n
            negative = self._negative(negative_prompt, negative_image_embed, count, config, seed)
            text, embeds = self._edit_condition(prompt, image_embed, images, keep, n, config, generator, negative)
            known, keep = images.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)
            size = self.decoder.image_size
            low = self._decode(embeds, text, config, generator, negative=negative,
                               eta=stochastic_eta(eta, config.decoder_sampler), inpaint=Inpainting(
                resize(known, size), keep_at(keep, size), jumps=jumps, jump_length=jump_length))
            out = self._upsample(low, config, generator, known=known, keep=keep, eta=eta)
            out = keep * known + (1 - keep) * out.float()  # exactly the image where kept
        return self._output(out, output)

    def _check_inpaint(self, prompt, image_embed, count: int, jumps, jump_length, eta) -> None:
        """inpaint's own arguments, checked before any of its paths (the early returns included) runs."""
        if prompt is not None:
            prompts_for(self._check_prompts(prompt, "prompt"), count)
        if image_embed is not None:
            unit_embeds(image_embed, count, self.clip.space.dim, self.device)
        Inpainting(torch.zeros(1), torch.zeros(1), jumps=jumps, jump_length=jump_length)  # checks them
        if eta is not None:
            check_eta(eta)

    def _plain(self, prompt, image_embed, count, n, seed, negative_prompt, negative_image_embed, output, settings):
        """Inpainting with nothing kept: generation from the condition alone."""
        if image_embed is None:
            return self.generate(prompts_for(prompt, count), n, seed=seed, negative_prompt=negative_prompt,
                                 negative_image_embed=negative_image_embed, output=output, **settings)
        return self.decode(unit_embeds(image_embed, count, self.clip.space.dim, self.device).repeat_interleave(n, 0), seed=seed, output=output,
                           **settings)
