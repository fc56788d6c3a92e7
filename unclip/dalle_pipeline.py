"""DallePipeline: DALL-E 1 (caption tokens -> transformer -> image tokens -> discrete VAE -> image), re-ranked by CLIP.

    pipe = DallePipeline.from_pretrained("outputs/demo-dalle/pipeline")
    images = pipe.generate(["a red circle", "a purple triangle at the top"], 4, seed=0, rerank=4)
    completed = pipe.complete(image, "a blue square", rows=3)   # keep the image's top 3 token rows, draw the rest

The calling convention is UnCLIPPipeline's (``from_pretrained``, ``save_pretrained``, ``generate`` with seeds,
``rerank`` and chunks of ``settings.max_batch``), so jobs and evaluators take either. The CLIP stage tokenizes the
captions (the transformer knows the ids of its training captions) and re-ranks candidates; a transformer and a dVAE
that do not fit (another codebook or grid) refuse to compose, naming both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from unclip.autoregressive import check_sampling
from unclip.checkpoint import load_stage, read_stage_config
from unclip.images import to_pil
from unclip.pipeline import best_of, pipeline_from_spec, read_pipeline_file, save_pipeline
from unclip.pipeline_inputs import check_count, check_output, check_prompts, check_seed, images_in, prompts_for

STAGES = ("clip", "dvae", "transformer")


@dataclass
class DalleSettings:
    """How the transformer draws image tokens (``unclip.autoregressive.sampling``) and how many images at once."""

    temperature: float = 1.0
    top_k: int | None = None  # None: every token of the codebook
    top_p: float | None = None  # None: no nucleus filter
    guidance_scale: float | None = None  # classifier-free guidance on the logits; None: off (1: the same)
    rerank: int = 1  # DALL-E's CLIP re-ranking: candidates drawn per image, the CLIP's favourite kept (1: none)
    max_batch: int = 64  # images made at once: generate() makes more in chunks of this many (candidates count)

    def check(self, vocab_size: int) -> None:
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, vocab_size=vocab_size)
        check_count("rerank", self.rerank)
        check_count("max_batch", self.max_batch)
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, (int, float))
                                                    and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a number >= 0 or None (off), got {self.guidance_scale!r}")

    def sampling(self) -> dict:
        """The keyword arguments of ``TextImageTransformer.sample``."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "guidance_scale": self.guidance_scale}


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
class DallePipeline:
    clip: torch.nn.Module
    dvae: torch.nn.Module
    transformer: torch.nn.Module
    settings: DalleSettings = field(default_factory=DalleSettings)
    sources: dict = field(default_factory=dict)  # stage name -> checkpoint directory

    def __post_init__(self) -> None:
        check_pairing(self.transformer, self.dvae,
                      *([_trained_with(self.sources["transformer"]), f"the dVAE ({self.sources['dvae']})"]
                        if "transformer" in self.sources and "dvae" in self.sources else []))
        end_id = end_token_id(self.clip)
        if self.transformer.vocabulary.end_id != end_id:
            raise ValueError(f"the transformer was trained on captions of a tokenizer whose end token is "
                             f"{self.transformer.vocabulary.end_id}, but this CLIP's is {end_id}; use the CLIP stage "
                             "the transformer was trained with (its job's clip_checkpoint)")
        self.settings.check(self.transformer.image_vocab_size)
        for module in self.modules():
            module.eval().requires_grad_(False)

    # -- construction -----------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.dvae, self.transformer]

    @property
    def image_size(self) -> int:
        return self.dvae.image_size

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device) -> "DallePipeline":
        for module in self.modules():
            module.to(device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, clip: str | Path | None = None,
                        dvae: str | Path | None = None, transformer: str | Path | None = None,
                        device: str | torch.device | None = None, use_ema: bool = True) -> "DallePipeline":
        """From one saved pipeline directory, or from the three stage checkpoints (directories or run
        directories: train/clip.py's, train/dvae.py's, train/dalle.py's). Stages given beside a pipeline
        directory replace its own."""
        settings, given = DalleSettings(), {"clip": clip, "dvae": dvae, "transformer": transformer}
        if path is not None:
            stages, settings = read_pipeline_file(Path(path), "dalle", STAGES, DalleSettings)
            given = {name: given[name] or Path(path) / stages[name] for name in STAGES}
        missing = [name for name in STAGES if given[name] is None]
        if missing:
            raise ValueError(f"DallePipeline.from_pretrained needs a pipeline directory or the stages {missing}")
        stage_of = {"clip": "clip", "dvae": "dvae", "transformer": "dalle"}
        loaded = {name: load_stage(given[name], stage=stage_of[name], use_ema=use_ema) for name in STAGES}
        pipe = cls(**{name: stage.model for name, stage in loaded.items()}, settings=settings,
                   sources={name: stage.path for name, stage in loaded.items()})
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_config(cls, spec: dict, **kwargs) -> "DallePipeline":
        """From a ``conf/pipeline/dalle.yaml`` node: ``path`` (a saved pipeline) or ``clip``/``dvae``/``transformer``
        stage checkpoints, and ``settings`` (DalleSettings overrides)."""
        return pipeline_from_spec(cls, spec, {name: spec.get(name) for name in STAGES}, **kwargs)

    def save_pretrained(self, directory: str | Path) -> Path:
        """As ``UnCLIPPipeline.save_pretrained``: a new, empty or saved-pipeline directory, replaced whole."""
        return save_pipeline(directory, self.sources, vars(self.settings), generator="dalle")

    # -- shared steps -----------------------------------------------------------------------
    def _settings(self, overrides: dict) -> DalleSettings:
        unknown = set(overrides) - set(vars(self.settings))
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(vars(self.settings))}")
        settings = DalleSettings(**{**vars(self.settings), **overrides})
        settings.check(self.transformer.image_vocab_size)
        return settings

    def _draw(self, text_tokens: torch.Tensor, config: DalleSettings, generator, prime=None) -> torch.Tensor:
        """Caption token rows [B, L] -> images [B, 3, S, S] in [-1, 1]."""
        tokens = self.transformer.sample(text_tokens.to(self.device), generator=generator, prime=prime,
                                         **config.sampling())
        grid = self.dvae.grid_size
        return self.dvae.decode(tokens.view(-1, grid, grid)).float()

    @staticmethod
    def _output(images: torch.Tensor, output: str):
        return to_pil(images) if output == "pil" else images

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
        prompts, output = check_prompts(prompts), check_output(output)
        config, generator = self._settings(settings if rerank is None else {**settings, "rerank": rerank}), self._generator(seed)
        rerank = config.rerank
        per_prompt = check_count("num_images_per_prompt", num_images_per_prompt) * rerank
        tokens = self.clip.tokenize(prompts)
        embeds = self.clip.encode_text(prompts).embed if rerank > 1 else None
        rows, chunk = len(prompts) * per_prompt, max(1, config.max_batch // rerank) * rerank
        parts = []
        for start in range(0, rows, chunk):
            prompt_index = torch.arange(start, min(start + chunk, rows)) // per_prompt
            images = self._draw(tokens[prompt_index], config, generator)
            if rerank > 1:
                images = best_of(self.clip, images, embeds[prompt_index.to(embeds.device)], rerank)
            parts.append(self._output(images, output))
        return torch.cat(parts) if output == "tensor" else [image for part in parts for image in part]

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
        prompts = prompts_for(prompt, len(images))
        config, generator = self._settings(settings), self._generator(seed)
        prime = self.dvae.encode(images)[:, :rows].flatten(1).repeat_interleave(n, 0)
        tokens = self.clip.tokenize(prompts).repeat_interleave(n, 0)
        return self._output(self._draw(tokens, config, generator, prime=prime), output)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))
