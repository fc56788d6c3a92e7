"""UnCLIPPipeline: CLIP -> prior -> decoder -> upsamplers, composed from stage checkpoints.

    pipe = UnCLIPPipeline.from_pretrained("outputs/demo/pipeline")
    images = pipe.generate(["a red circle", "a purple triangle at the top"], seed=0)
    pipe.inpaint(image, mask, "a blue square")          # mask: white = paint here, black = keep
    pipe.img2img(image, "a green circle", strength=0.6)
    pipe.mix([(image, 0.5), ("a blue square", 0.5)])
    pipe.generate("a circle", negative_prompt="red")

Every call takes a seed and gives the same images for it. Stages from different CLIP embedding spaces
refuse to compose, naming both fingerprints. Each public method is a few lines over the shared steps: encode
(text, images), the prior, the decoder, the upsamplers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from unclip.checkpoint import (
    LoadedStage,
    commit_directory,
    load_stage,
    resolve_checkpoint,
    verify_stage_files,
    write_json_atomic,
    write_manifest,
)
from unclip.diffusion import Inpainting, strength_skip
from unclip.diffusion.graphs import check_cuda_graphs
from unclip.embedding import EmbeddingSpace, TextCondition
from unclip.images import resize, to_pil
from unclip.masks import fill_colour, keep_at
from unclip.pipeline_inputs import (
    check_amounts,
    check_count,
    check_finite,
    check_mix,
    check_output,
    check_prompts,
    check_seed,
    images_in,
    keep_masks,
    prompts_for,
    unit_embeds,
)
from unclip.weights import CheckpointError

PIPELINE_FILE = "pipeline.json"
STAGE_FILES = ("model.safetensors", "ema.safetensors", "config.json", "space.json")  # what a saved pipeline copies
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
    upsampler_steps: int = 25
    upsampler_aug_level: float = 0.05
    rerank: int = 1  # CLIP re-ranking: generate draws this many candidates (prior and decoder) per image and keeps the
                     # one the CLIP finds most similar to the prompt, ranked at the decoder's size (only it upsampled)
    cuda_graphs: str = "auto"  # every sampling loop replayed from a CUDA graph on CUDA (unclip.diffusion.graphs)
    max_batch: int = 64  # images a stage makes at once: every call makes more in chunks of this many

    def check(self) -> None:
        self.cuda_graphs = check_cuda_graphs(self.cuda_graphs)
        for name in ("prior_steps", "decoder_steps", "upsampler_steps", "prior_candidates", "rerank", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("prior_guidance", "decoder_guidance", "decoder_eta", "upsampler_aug_level"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


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


# Which class loads a saved pipeline, by pipeline.json's "generator" (absent: unclip).
LOADERS = {"unclip": "unclip.pipeline.UnCLIPPipeline", "dalle": "unclip.dalle_pipeline.DallePipeline"}


def read_pipeline_file(path: Path, generator: str, stage_names: Sequence[str], settings_class) -> tuple[dict, object]:
    """A saved ``generator`` pipeline's ``pipeline.json``: its stages (``stage_names`` each present) and its
    settings as ``settings_class``."""
    manifest_file = path / PIPELINE_FILE
    saved_by = "give a directory saved by UnCLIPPipeline.save_pretrained (train/demo.py saves outputs/demo/pipeline)"
    if not path.exists():
        raise CheckpointError(f"pipeline {path} does not exist; {saved_by}, or the stages' checkpoints")
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a saved pipeline: {PIPELINE_FILE} is missing; {saved_by}, or the "
                              "stages' checkpoints")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_file} is damaged, not JSON ({err}); save the pipeline again") from err
    known = {"format", "stages", "settings", "generator"}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict) or set(manifest) - known:
        raise CheckpointError(f"{manifest_file} is not a pipeline file: expected an object with 'stages' (and "
                              f"'format', 'settings'), got {json.dumps(manifest)[:200]}; save the pipeline again")
    saved = manifest.get("generator", "unclip")
    if saved != generator:
        raise CheckpointError(f"{path} is a saved {saved!r} pipeline, not a {generator!r} one: load it with "
                              f"{LOADERS.get(saved, saved)}.from_pretrained (jobs: pipeline={saved})")
    stages = manifest["stages"]
    for name in stage_names:
        if not isinstance(stages.get(name), str):
            raise CheckpointError(f"{manifest_file} lists no {name} stage; save the pipeline again")
        if not (path / stages[name]).exists():
            raise CheckpointError(f"pipeline {path} is missing its {name} stage ({path / stages[name]}); save the "
                                  "pipeline again")
    settings = manifest.get("settings", {})
    unknown = sorted(set(settings) - set(vars(settings_class()))) if isinstance(settings, dict) else settings
    if unknown:
        raise CheckpointError(f"{manifest_file} has unknown settings {unknown}; known: "
                              f"{sorted(vars(settings_class()))}")
    return stages, settings_class(**settings)


def pipeline_from_spec(cls, spec: dict, stages: dict, **kwargs):
    """Each pipeline class's ``from_config``: ``cls.from_pretrained`` of ``spec["path"]`` (a saved pipeline) or else
    of ``stages`` (its stage checkpoints, by from_pretrained's names), with ``spec["settings"]`` over its settings."""
    pipe = cls.from_pretrained(spec["path"], **kwargs) if spec.get("path") else cls.from_pretrained(**stages, **kwargs)
    pipe.settings = pipe._settings(spec.get("settings") or {})
    return pipe


def _read_pipeline_file(path: Path) -> tuple[dict, GenerationSettings]:
    """A saved unCLIP pipeline's ``pipeline.json``: its stages (each directory present) and generation settings."""
    return read_pipeline_file(path, "unclip", ("clip", "prior", "decoder"), GenerationSettings)


def _check_replaceable(directory: Path) -> None:
    """``save_pretrained`` writes a new or empty directory, or replaces a saved pipeline; nothing else."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot save the pipeline to {directory}: it is a file; choose a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / PIPELINE_FILE).is_file():
        raise FileExistsError(
            f"cannot save the pipeline to {directory}: it is not empty and not a saved pipeline (no {PIPELINE_FILE}), "
            "and saving would replace everything in it; choose a new or empty directory, or move its files away"
        )


def save_pipeline(directory: str | Path, sources: dict, settings: dict, generator: str = "unclip") -> Path:
    """Copy every stage of ``sources`` (stage name -> checkpoint; ``upsampler_<i>`` names listed as upsamplers)
    into one directory with a pipeline.json. The directory must be new, empty or a saved pipeline; a saved
    pipeline is replaced only once the new one is complete (written to a temporary sibling, then swapped in), so
    a failed save leaves it as it was."""
    directory = Path(directory)
    if not sources:
        raise ValueError("save_pretrained needs a pipeline built by from_pretrained (stage checkpoints to copy)")
    _check_replaceable(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_stages(tmp, sources, settings, generator)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    commit_directory(tmp, directory)
    return directory


def _write_stages(target_root: Path, sources: dict, settings: dict, generator: str) -> None:
    stages: dict = {"upsamplers": []} if generator == "unclip" else {}
    for name, source in sources.items():
        source = resolve_checkpoint(source)
        target = target_root / name
        target.mkdir()
        files = [f for f in STAGE_FILES if (source / f).is_file()]
        for file in files:
            shutil.copy2(source / file, target / file)
        verify_stage_files(source, files, "copy {} into a saved pipeline")  # the copies are checked against the source's manifest, if any
        write_manifest(target)
        if name.startswith("upsampler"):
            stages["upsamplers"].append(name)
        else:
            stages[name] = name
    manifest = {"format": 1, "stages": stages, "settings": settings}
    write_json_atomic(target_root / PIPELINE_FILE, manifest if generator == "unclip" else
                      {**manifest, "generator": generator})


def best_of(clip, images: torch.Tensor, text_embeds: torch.Tensor, rerank: int) -> torch.Tensor:
    """CLIP re-ranking: of every ``rerank`` consecutive images [B * rerank, 3, H, W], the one whose CLIP image
    embedding is most similar to its caption's embedding (``text_embeds`` [B * rerank, D], one row per image)."""
    scores = (clip.encode_image(images) * text_embeds.float()).sum(-1).view(-1, rerank)
    best = scores.argmax(dim=1) + torch.arange(0, len(scores) * rerank, rerank, device=scores.device)
    return images[best]


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
    def image_size(self) -> int:
        """The side of the images the pipeline makes (its last stage's)."""
        return self.upsamplers[-1].image_size if self.upsamplers else self.decoder.image_size

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs (its CLIP's device)."""
        return getattr(self.clip, "device", None) or next(self.clip.parameters()).device

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
        """From one saved pipeline directory, or from stage checkpoints (directories or run directories). Stages
        given beside a pipeline directory replace its own (e.g. ``decoder=`` an inpainting decoder)."""
        settings = GenerationSettings()
        if path is not None:
            path = Path(path)
            stages, settings = _read_pipeline_file(path)
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
    def from_config(cls, spec: dict, **kwargs) -> "UnCLIPPipeline":
        """From a ``conf/pipeline/`` node: ``path`` (a saved pipeline) or ``clip``/``prior``/``decoder``/``upsamplers``
        stage checkpoints, and ``settings`` (GenerationSettings overrides)."""
        stages = {"clip": spec.get("clip"), "prior": spec.get("prior"), "decoder": spec.get("decoder"),
                  "upsamplers": spec.get("upsamplers") or []}
        return pipeline_from_spec(cls, spec, stages, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Copy every stage (weights, config, space) into one directory with a pipeline.json. The directory must
        be new, empty or a saved pipeline; a saved pipeline is replaced only once the new one is complete (written
        to a temporary sibling, then swapped in), so a failed save leaves it as it was."""
        return save_pipeline(directory, self.sources, vars(self.settings))

    # -- the shared steps ----------------------------------------------------------------------
    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))

    def autocast(self):
        """The pipeline's mixed precision (bfloat16 on CPU and CUDA), for code that calls its stages directly."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type in ("cpu", "cuda"))

    @contextmanager
    def _session(self, seed: int, overrides: dict, output: str = "pil"
                 ) -> Iterator[tuple[GenerationSettings, torch.Generator]]:
        """One call's settings (defaults + ``overrides``, checked) and generator, under autocast; ``output`` is
        checked before any work."""
        check_output(output)
        config = self._settings(overrides)
        generator = self._generator(seed)
        with self.autocast():
            yield config, generator

    def _settings(self, overrides: dict) -> GenerationSettings:
        unknown = set(overrides) - set(vars(self.settings))
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(vars(self.settings))}")
        settings = GenerationSettings(**{**vars(self.settings), **overrides})
        settings.check()
        return settings

    @staticmethod
    def _output(images: torch.Tensor, output: str):
        check_output(output)
        images = images.float()
        return to_pil(images) if output == "pil" else images

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
            **({"negative": _take(negative_text, rows, len(text))} if negative_text is not None else {}),
        ) for rows in _chunks(len(text), config)])

    def _negative(self, prompt: str | None, image_embed, count: int, config: GenerationSettings,
                  seed: int) -> Negative | None:
        """The negative for ``count`` rows: a prompt's caption and (unless ``image_embed`` is given) its image
        embedding from the prior, drawn from a stream of its own so that the other draws do not move."""
        if prompt is None and image_embed is None:
            return None
        text = self.clip.encode_text(check_prompts(prompt, "negative_prompt")) if prompt is not None else None
        if image_embed is not None:
            embed = unit_embeds(image_embed, count, self.clip.space.dim, self.device, "negative_image_embed")
        else:
            embed = self._prior(text, config, self._generator(seed)).float().expand(count, -1)
        return Negative(None if text is None else text.repeat_interleave(count), embed)

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
                cuda_graphs=config.cuda_graphs,
                **({"init_image": _take(init, rows, total), "strength": strength} if init is not None else {}),
            ))
        return torch.cat(parts)

    def _upsample(self, images: torch.Tensor, config: GenerationSettings, generator, *, known=None, keep=None,
                  eta: float = 0.0) -> torch.Tensor:
        """The upsamplers in turn, ``config.max_batch`` images at a time; with ``known``/``keep`` (at the last
        stage's size) each inpaints too, keeping the known image (resized to its size) where the mask (resized with
        ``keep_at``) keeps it."""
        for upsampler in self.upsamplers:
            size, total, parts = upsampler.image_size, len(images), []
            for rows in _chunks(total, config):
                inpaint = None if known is None else Inpainting(resize(known[rows], size), keep_at(keep[rows], size))
                parts.append(upsampler.sample(images[rows], steps=config.upsampler_steps,
                                              aug_level=config.upsampler_aug_level, generator=generator,
                                              inpaint=inpaint, eta=eta if known is not None else 0.0,
                                              cuda_graphs=config.cuda_graphs))
            images = torch.cat(parts)
        return images

    def _render(self, image_embed, text, config, generator, **decode) -> torch.Tensor:
        """Decoder, then upsamplers (no inpainting)."""
        return self._upsample(self._decode(image_embed, text, config, generator, **decode), config, generator)

    def _best_of(self, images: torch.Tensor, text: TextCondition, rerank: int) -> torch.Tensor:
        return best_of(self.clip, images, text.embed, rerank)

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
        prompts = check_prompts(prompts)
        count = check_count("num_images_per_prompt", num_images_per_prompt)
        if rerank is not None:
            settings = {**settings, "rerank": check_count("rerank", rerank)}
        with self._session(seed, settings, output) as (config, generator):
            rerank = config.rerank
            per_prompt = count * rerank
            rows = len(prompts) * per_prompt  # candidates
            if negative_image_embed is not None:  # checked once for every row
                unit_embeds(negative_image_embed, rows, self.clip.space.dim, self.device, "negative_image_embed")
            prompt_text = self.clip.encode_text(prompts)
            chunk = max(1, config.max_batch // rerank) * rerank
            parts = []
            for start in range(0, rows, chunk):
                index = torch.arange(start, min(start + chunk, rows), device=prompt_text.embed.device)
                text = prompt_text[index // per_prompt]
                negative = self._negative(negative_prompt, _rows(negative_image_embed, start, len(index), rows),
                                          len(index), config, seed)
                image_embed = self._prior(text, config, generator, negative)
                images = self._decode(image_embed, text, config, generator, negative=negative).float()
                if rerank > 1:
                    images = self._best_of(images, text, rerank)
                parts.append(self._output(self._upsample(images, config, generator), output))
        return torch.cat(parts) if output == "tensor" else [image for part in parts for image in part]

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
    def variations(self, image, n: int = 4, *, seed: int = 0, eta: float = 1.0, strength: float = 1.0,
                   negative_prompt: str | None = None, negative_image_embed: torch.Tensor | None = None,
                   output: str = "pil", **settings):
        """``n`` images sharing the CLIP image embedding of ``image``, decoded with fresh noise (DDIM eta > 0).
        ``strength < 1`` starts from the image itself noised that far (1: from pure noise; 0: the image)."""
        check_count("n", n)
        strength_skip(1, strength)  # checks it
        with self._session(seed, settings, output) as (config, generator):
            embed = self.clip.encode_image(self._images_in(image)).float().repeat(n, 1)
            negative = self._negative(negative_prompt, negative_image_embed, n, config, seed)
            init = None if strength == 1 else self._images_in(image, self.decoder.image_size)[:1].repeat(n, 1, 1, 1)
            images = self._render(embed, None, config, generator, eta=eta, negative=negative, init=init,
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
        prompts = prompts_for(prompt, len(images))
        if strength == 0:
            return self._output(images.repeat_interleave(n, 0), output)
        with self._session(seed, settings, output) as (config, generator):
            text = self.clip.encode_text(prompts).repeat_interleave(n)
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
        check_prompts([from_text, to_text])
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
        with self._session(seed, settings, output) as (config, generator):
            embeds = [self._embedding_of(item, config, generator) for item, _ in items]
            mixed = sum(weight * embed for (_, weight), embed in zip(items, embeds))
            if float(mixed.norm()) < 1e-6:
                raise ValueError("the weighted embeddings cancel out (their sum is zero); change the weights")
            images = self._render(F.normalize(mixed, dim=-1).repeat(n, 1), None, config, generator, eta=eta)
        return self._output(images, output)

    def _embedding_of(self, item, config: GenerationSettings, generator) -> torch.Tensor:
        """[1, D]: a text's through the prior, an image's from the CLIP."""
        if isinstance(item, str):
            return self._prior(self.clip.encode_text(check_prompts(item)), config, generator).float()
        return self.clip.encode_image(self._images_in(item)[:1]).float()

    # -- inpainting ---------------------------------------------------------------------------------
    def _edit_condition(self, prompt, image_embed, images, keep, n, config, generator, negative):
        """(caption or None, image embeddings [B * n, D]) for inpainting: a prompt through the prior; a given image
        embedding (with the prompt, if any, as the decoder's caption); neither: the CLIP embedding of the image
        with the hole filled by the kept pixels' median colour ("more of the surroundings": removes objects)."""
        count = len(images)
        text = None if prompt is None else self.clip.encode_text(prompts_for(prompt, count)).repeat_interleave(n)
        if image_embed is not None:
            return text, unit_embeds(image_embed, count, self.clip.space.dim, self.device).repeat_interleave(n, 0)
        if text is not None:
            return text, self._prior(text, config, generator, negative)
        filled = keep * images + (1 - keep) * fill_colour(images, keep)
        return None, self.clip.encode_image(filled).float().repeat_interleave(n, 0)

    @torch.no_grad()
    def inpaint(self, image, mask, prompt: str | Sequence[str] | None = None, *, image_embed: torch.Tensor | None = None,
                n: int = 1, jumps: int | None = None, jump_length: int = 1, eta: float = 1.0, seed: int = 0,
                negative_prompt: str | None = None, negative_image_embed: torch.Tensor | None = None,
                output: str = "pil", **settings):
        """Fill the white part of ``mask`` in ``image`` (a PIL image, a list of them, or tensors [B, 3, H, W]); keep
        the rest exactly. ``n`` results per image, in image order, at the pipeline's size (the image is resized to
        it, the mask with it). The fill follows ``prompt`` (through the prior) or ``image_embed``; with neither, the
        image's own surroundings (object removal).

        A plain decoder inpaints with RePaint (``jumps`` resampling passes a step, default ``DEFAULT_JUMPS``; each
        costs another model call a step); an inpainting decoder (``inpaint=True``) sees the masked image and needs
        none (default 0). The upsamplers inpaint too, keeping the image at their size. An all-black mask returns the
        image; an all-white one is plain generation: ``generate(prompt, n)`` or ``decode(image_embed)``."""
        check_count("n", n)
        images = self._images_in(image, self.image_size)
        keep = keep_masks(mask, image, len(images), self.image_size, self.device)
        if bool((keep == 1).all()):  # nothing to fill
            return self._output(images.repeat_interleave(n, 0), output)
        if bool((keep == 0).all()) and (prompt is not None or image_embed is not None):
            return self._plain(prompt, image_embed, len(images), n, seed, negative_prompt, negative_image_embed,
                               output, settings)
        jumps = (0 if getattr(self.decoder, "inpaints", False) else DEFAULT_JUMPS) if jumps is None else jumps
        with self._session(seed, settings, output) as (config, generator):
            count = len(images) * n
            negative = self._negative(negative_prompt, negative_image_embed, count, config, seed)
            text, embeds = self._edit_condition(prompt, image_embed, images, keep, n, config, generator, negative)
            known, keep = images.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)
            size = self.decoder.image_size
            low = self._decode(embeds, text, config, generator, negative=negative, eta=eta, inpaint=Inpainting(
                resize(known, size), keep_at(keep, size), jumps=jumps, jump_length=jump_length))
            out = self._upsample(low, config, generator, known=known, keep=keep, eta=eta)
            out = keep * known + (1 - keep) * out.float()  # exactly the image where kept
        return self._output(out, output)

    def _plain(self, prompt, image_embed, count, n, seed, negative_prompt, negative_image_embed, output, settings):
        """Inpainting with nothing kept: generation from the condition alone."""
        if image_embed is None:
            return self.generate(prompts_for(prompt, count), n, seed=seed, negative_prompt=negative_prompt,
                                 negative_image_embed=negative_image_embed, output=output, **settings)
        return self.decode(unit_embeds(image_embed, count, self.clip.space.dim, self.device).repeat_interleave(n, 0), seed=seed, output=output,
                           **settings)
