"""DallePipeline: DALL-E 1 (caption tokens -> transformer -> image tokens -> discrete VAE -> image), re-ranked by CLIP.

    pipe = DallePipeline.from_pretrained("outputs/demo-dalle/pipeline")
    images = pipe.generate(["a red circle", "a purple triangle at the top"], 4, seed=0, rerank=4)
    completed = pipe.complete(image, "a blue square", rows=3)   # keep the image's top 3 token rows, draw the rest
    samples = pipe.unconditional(16, seed=0)                    # no prompt: the null caption, no re-ranking
    samples = pipe.unconditional(16, rerank=4, captions=training_captions)  # best of 4 by a caption bank
    pipe = DallePipeline.from_pretrained("outputs/demo-dalle/pipeline", captioner="outputs/dalle/captioner")
    captions = pipe.caption(images, n=2, rerank=8)               # image -> text (an image_first transformer)

The calling convention is every pipeline's (``unclip.pipelines.base``: ``from_pretrained``, ``save_pretrained``,
``generate`` with seeds, ``rerank`` and chunks of ``settings.max_batch``), so jobs and evaluators take either. The CLIP stage tokenizes the
captions (the transformer knows the ids of its training captions) and re-ranks candidates; a transformer and a dVAE
that do not fit (another codebook or grid) refuse to compose, naming both.

The optional fourth stage ``captioner`` is the same transformer trained image-first (``train/dalle.py
dalle=captioner``) on the same CLIP and dVAE: ``caption`` encodes images with the dVAE, samples caption tokens and
decodes them with the CLIP's tokenizer, so one pipeline (saved with it) both draws and describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from unclip.autoregressive import check_sampling
from unclip.checkpoint import load_stage, read_stage_config
from unclip.pipeline_inputs import check_count, check_output, images_in, prompts_for
from unclip.pipelines.base import Pipeline, in_chunks, read_pipeline_file

STAGES = ("clip", "dvae", "transformer")
OPTIONAL_STAGES = ("captioner",)  # loaded and saved where given
CAPTION_SETTINGS = ("temperature", "top_k", "top_p", "rerank", "max_batch")  # the DalleSettings a caption uses


@dataclass
class DalleSettings:
    """How the transformer draws image tokens (``unclip.autoregressive.sampling``) and how many images at once."""

    temperature: float = 1.0
    top_k: int | None = None  # None: every token of the codebook
    top_p: float | None = None  # None: no nucleus filter
    guidance_scale: float | None = None  # classifier-free guidance on the logits; None: off (1: the same)
    rerank: int = 1  # DALL-E's CLIP re-ranking: candidates drawn per image, the CLIP's favourite kept (1: none)
    max_batch: int = 64  # images made at once: generate() makes more in chunks of this many (candidates count)

    def check(self, vocab_size: int | None = None) -> None:
        """Each setting of its type and range (``vocab_size``: the transformer's image codebook, top_k's bound)."""
        _check_types(self)
        if isinstance(self.temperature, float) and not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       vocab_size=vocab_size or 2**62)
        check_count("rerank", self.rerank)
        check_count("max_batch", self.max_batch)
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, (int, float))
                                                    and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a number >= 0 or None (off), got {self.guidance_scale!r}")

    def caption_sampling(self) -> dict:
        """The keyword arguments of ``TextImageTransformer.sample_captions``."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def sampling(self) -> dict:
        """The keyword arguments of ``TextImageTransformer.sample``."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "guidance_scale": self.guidance_scale}


_NUMBER, _NONE = (int, float), type(None)
# Each setting's types, and how an error names them.
_TYPES = {"temperature": (_NUMBER, "a number"), "top_k": ((int, _NONE), "a whole number or None"),
          "top_p": ((*_NUMBER, _NONE), "a number or None"), "guidance_scale": ((*_NUMBER, _NONE), "a number or None"),
          "rerank": ((int,), "a whole number"), "max_batch": ((int,), "a whole number")}


def _check_types(settings: DalleSettings) -> None:
    """A setting of the wrong type (``temperature="hot"``, ``top_k=2.5``) named here, not deep in the sampler."""
    for name, (allowed, kinds) in _TYPES.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise TypeError(f"the DALL-E setting {name} must be {kinds}, got {value!r:.60} ({type(value).__name__})")


def end_token_id(clip) -> int:
    """The CLIP tokenizer's end-of-text id: the second token of the empty caption (after the start token)."""
    return int(clip.tokenize([""])[0, 1])


def check_pairing(transformer, dvae, transformer_from: str = "the transformer", dvae_from: str = "the dVAE") -> None:
    """A transformer models the tokens of the dVAE it was trained on: the same codebook size and grid."""
    tokens = dvae.grid_size**2
    if transformer.image_vocab_size != dvae.codebook_size or transformer.image_length != tokens:
        raise ValueError(
            f"{transformer_from} models {transformer.image_length} image tokens from a codebook of "
            f"{transformer.image_vocab_size}, but {dvae_from} has a {dvae.grid_size}x{dvae.grid_size} grid "
            f"({tokens} tokens) from a codebook of {dvae.codebook_size}; pair the transformer with the dVAE it was "
            "trained on (its job's dvae_checkpoint)"
        )


def _trained_with(transformer_path) -> str:
    """'the transformer (PATH, trained with the dVAE DVAE)' as far as its checkpoint tells."""
    try:
        directory, config, _ = read_stage_config(transformer_path)
    except Exception:  # noqa: BLE001 (a description only; loading reports real problems)
        return f"the transformer ({transformer_path})"
    dvae = (config.get("job") or {}).get("dvae_checkpoint")
    return f"the transformer ({directory}" + (f", trained with the dVAE {dvae})" if dvae else ")")


@dataclass
class DallePipeline(Pipeline):
    clip: torch.nn.Module
    dvae: torch.nn.Module
    transformer: torch.nn.Module
    settings: DalleSettings = field(default_factory=DalleSettings)
    sources: dict = field(default_factory=dict)  # stage name -> checkpoint directory
    captioner: torch.nn.Module | None = None  # an image_first transformer on the same CLIP and dVAE (caption())

    generator: ClassVar[str] = "dalle"
    stages: ClassVar[tuple[str, ...]] = STAGES
    settings_class: ClassVar[type] = DalleSettings
    operations: ClassVar[frozenset[str]] = frozenset({"generate", "unconditional", "complete"})
    # without a prompt: no CLIP re-ranking (nothing to compare with) and no guidance (both branches the null caption)
    no_prompt_settings: ClassVar[dict[str, object]] = {"guidance_scale": None}
    demo_dir: ClassVar[str] = "demo-dalle"
    autocast_dtype: ClassVar[torch.dtype | None] = None  # it samples (and re-ranks) in float32

    def __post_init__(self) -> None:
        for name, order in (("transformer", "text_first"), ("captioner", "image_first")):
            model = getattr(self, name)
            if model is None:
                continue
            described = self._described(name)
            if getattr(model, "order", "text_first") != order:
                raise ValueError(f"{described} has order={model.order}, but a pipeline's {name} must have order={order}; "
                                 "give a text_first transformer as transformer= and an image_first one (train/dalle.py "
                                 "dalle=captioner) as captioner=")
            check_pairing(model, self.dvae, described,
                          f"the dVAE ({self.sources['dvae']})" if "dvae" in self.sources else "the dVAE")
            end_id = end_token_id(self.clip)
            if model.vocabulary.end_id != end_id:
                raise ValueError(f"{described} was trained on captions of a tokenizer whose end token is "
                                 f"{model.vocabulary.end_id}, but this CLIP's is {end_id}; use the CLIP stage it was "
                                 "trained with (its job's clip_checkpoint)")
        self.settings.check(self.transformer.image_vocab_size)
        for module in self.modules():
            module.eval().requires_grad_(False)

    def _described(self, name: str) -> str:
        """'the transformer (PATH, trained with the dVAE DVAE)' / 'the captioner (...)' as far as is known."""
        if name not in self.sources:
            return f"the {name}"
        return _trained_with(self.sources[name]).replace("the transformer", f"the {name}", 1)

    def modules(self) -> list[torch.nn.Module]:
        return super().modules() + [self.captioner] * (self.captioner is not None)

    # -- construction -----------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.dvae.image_size

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, clip: str | Path | None = None,
                        dvae: str | Path | None = None, transformer: str | Path | None = None,
                        captioner: str | Path | None = None, device: str | torch.device | None = None,
                        use_ema: bool = True) -> "DallePipeline":
        """From one saved pipeline directory, or from the three stage checkpoints (directories or run
        directories: train/clip.py's, train/dvae.py's, train/dalle.py's), and optionally a ``captioner``
        (train/dalle.py dalle=captioner's run). Stages given beside a pipeline directory replace its own."""
        settings = DalleSettings()
        given = {"clip": clip, "dvae": dvae, "transformer": transformer, "captioner": captioner}
        if path is not None:
            stages, settings = read_pipeline_file(Path(path), cls)
            given = {name: given[name] or (Path(path) / stages[name] if isinstance(stages.get(name), str) else None)
                     for name in given}
        missing = [name for name in STAGES if given[name] is None]
        if missing:
            raise ValueError(f"DallePipeline.from_pretrained needs a pipeline directory or the stages {missing}")
        stage_of = {"clip": "clip", "dvae": "dvae", "transformer": "dalle", "captioner": "dalle"}
        loaded = {name: load_stage(source, stage=stage_of[name], use_ema=use_ema)
                  for name, source in given.items() if source is not None}
        pipe = cls(**{name: stage.model for name, stage in loaded.items()}, settings=settings,
                   sources={name: stage.path for name, stage in loaded.items()})
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_config(cls, spec: dict, **kwargs) -> "DallePipeline":
        """As every pipeline's; a ``captioner`` given beside ``path`` joins (or replaces) the saved pipeline's."""
        if spec.get("path") and spec.get("captioner"):
            kwargs = {**kwargs, "captioner": spec["captioner"]}
        return super().from_config(spec, **kwargs)

    @classmethod
    def stage_spec(cls, spec: dict) -> dict:
        return {name: spec.get(name) for name in STAGES + OPTIONAL_STAGES}

    # -- shared steps -----------------------------------------------------------------------
    def _check_settings(self, settings: DalleSettings) -> None:
        settings.check(self.transformer.image_vocab_size)

    def _draw(self, text_tokens: torch.Tensor, config: DalleSettings, generator, prime=None) -> torch.Tensor:
        """Caption token rows [B, L] -> images [B, 3, S, S] in [-1, 1]."""
        tokens = self.transformer.sample(text_tokens.to(self.device), generator=generator, prime=prime,
                                         **config.sampling())
        grid = self.dvae.grid_size
        return self.dvae.decode(tokens.view(-1, grid, grid)).float()

    def _check_unconditional(self) -> None:
        self.transformer.check_unconditional()

    def _unconditional_candidates(self, count: int, config: DalleSettings, generator, bank) -> torch.Tensor:
        """The transformer after the null caption (temperature, top_k, top_p as set), the dVAE."""
        tokens = self.transformer.sample_unconditional(count, temperature=config.temperature, top_k=config.top_k,
                                                       top_p=config.top_p, generator=generator)
        return self.dvae.decode(tokens.view(-1, self.dvae.grid_size, self.dvae.grid_size)).float()

    # -- text to image ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | str, num_images_per_prompt: int = 1, *, seed: int = 0,
                 rerank: int | None = None, negative_prompt: str | None = None, output: str = "pil", **settings):
        """Text -> images: ``num_images_per_prompt`` per prompt, in prompt order, made ``settings.max_batch`` at a
        time (the first chunk's images are those of a request for only them). ``rerank=k`` draws k candidates per
        image and keeps the one the CLIP finds most similar to the prompt (None: the settings' ``rerank``)."""
        if negative_prompt is not None:
            raise ValueError("the DALL-E pipeline takes no negative_prompt (its guidance's other branch is the "
                             "null caption); leave it out")
        prompts = self._check_prompts(prompts)
        count = check_count("num_images_per_prompt", num_images_per_prompt)
        if rerank is not None:
            settings = {**settings, "rerank": check_count("rerank", rerank)}
        config, generator = self._prepare(seed, settings, output)
        return self._ranked_images(prompts, count, config, output,
                                   lambda text, _: self._draw(text.tokens, config, generator))

    @torch.no_grad()
    def complete(self, image, prompt: str | Sequence[str], rows: int, *, n: int = 1, seed: int = 0,
                 output: str = "pil", **settings):
        """Image completion: keep the top ``rows`` rows of the image's dVAE tokens and draw the rest for the
        ``prompt`` (one, or one per image). ``image``: a PIL image, a list of them, or tensors [B, 3, H, W] in
        [-1, 1] (resized to the pipeline's size); ``n`` completions per image, in image order."""
        output, grid = check_output(output), self.dvae.grid_size
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows < grid:
            raise ValueError(f"rows must be a whole number from 1 to {grid - 1} (the dVAE's grid has {grid} rows; "
                             f"{grid} would keep the whole image), got {rows!r}")
        check_count("n", n)
        images = images_in(image, self.image_size, self.device)
        prompts = prompts_for(self._check_prompts(prompt, "prompt"), len(images))
        config, generator = self._prepare(seed, settings, output)
        primes = in_chunks(lambda batch: self.dvae.encode(batch)[:, :rows].flatten(1), images, config.max_batch)
        tokens = self.clip.tokenize(prompts)
        index, parts = torch.arange(len(images) * n) // n, []
        for start in range(0, len(index), config.max_batch):
            rows_of = index[start:start + config.max_batch]
            parts.append(self._output(self._draw(tokens[rows_of], config, generator,
                                                 prime=primes[rows_of.to(primes.device)]), output))
        return self._joined(parts, output)

    # -- image to text ------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, images, n: int = 1, *, seed: int = 0, rerank: int | None = None, **settings) -> list[str]:
        """Image -> text with the ``captioner`` stage: ``n`` captions per image, in image order. ``images``: a PIL
        image or a list of them (centre-cropped and resized, as ``complete`` reads them) or tensors [B, 3, S, S] in
        [-1, 1] at the dVAE's size S (a tensor of another size is an error: resize it, unclip.images.resize).
        ``rerank=k`` draws k captions per caption asked and keeps the one whose CLIP text embedding is most similar
        to the image's (None: the settings' ``rerank``); ``settings``: temperature, top_k, top_p (the call's own,
        default 1, None, None: the pipeline's settings are tuned to its image codebook), max_batch."""
        if self.captioner is None:
            raise ValueError("this DALL-E pipeline has no captioner stage; load one with DallePipeline.from_pretrained"
                             "(..., captioner=RUN_DIR) (an image_first transformer: python train/dalle.py "
                             "dalle=captioner)")
        extra = sorted(set(settings) - set(CAPTION_SETTINGS))
        if extra and not set(extra) - set(vars(self.settings)):
            raise ValueError(f"caption takes the settings {list(CAPTION_SETTINGS)}, not {extra} (a captioner samples "
                             "words for the image it reads, with no guidance)")
        count = check_count("n", n)
        if rerank is not None:
            settings = {**settings, "rerank": check_count("rerank", rerank)}
        own = {"temperature": 1.0, "top_k": None, "top_p": None}  # the pipeline's are its image sampling's
        config = self._settings({**own, **settings}, check=lambda s: s.check(len(self.captioner.vocabulary)))
        generator = self._generator(seed)
        pixels = self._caption_images(images)
        tokens = in_chunks(lambda batch: self.dvae.encode(batch).flatten(1), pixels, config.max_batch)
        per_image = count * config.rerank
        index = torch.arange(len(pixels) * per_image, device=tokens.device) // per_image
        texts = []
        for start in range(0, len(index), config.max_batch):
            rows = self.captioner.sample_captions(tokens[index[start:start + config.max_batch]], generator=generator,
                                                  **config.caption_sampling())
            texts += self.clip.decode(rows)
        if config.rerank == 1:
            return texts
        return self._best_captions(pixels, texts, config)

    def _caption_images(self, images) -> torch.Tensor:
        """``caption``'s images as [B, 3, S, S] at the dVAE's size S (tensors must have it already)."""
        size = self.image_size
        pixels = images_in(images, size, self.device, resize_tensors=False)
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"the captioner reads {size}x{size} images (its dVAE's image_size), got an image tensor "
                             f"of {pixels.shape[-2]}x{pixels.shape[-1]}; resize it (unclip.images.resize) or pass PIL "
                             "images, which are centre-cropped and resized")
        return pixels

    def _best_captions(self, pixels: torch.Tensor, texts: list[str], config: DalleSettings) -> list[str]:
        """Of every ``config.rerank`` consecutive candidate captions, the one the CLIP finds most similar to its image."""
        per_image = len(texts) // len(pixels)
        image_embeds = in_chunks(self.clip.encode_image, pixels, config.max_batch).float()
        text_embeds = self._encode_text(texts, config.max_batch).embed.float()
        owner = torch.arange(len(texts), device=text_embeds.device) // per_image
        scores = (text_embeds * image_embeds[owner]).sum(-1).view(-1, config.rerank)
        best = scores.argmax(dim=1) + torch.arange(0, len(texts), config.rerank, device=scores.device)
        return [texts[i] for i in best.tolist()]
