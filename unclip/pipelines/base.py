"""What every pipeline shares (in the spirit of diffusers' ``DiffusionPipeline``): the saved-pipeline format
(``pipeline.json`` beside a copy of each stage), device and precision, seeds, settings merged over the pipeline's
own and checked, output conversion, ``from_config``/``save_pretrained``, the operations a caller may ask for
(``supports``), and the one loop that makes images in chunks of ``max_batch`` while re-ranking candidates by CLIP.

A subclass names its generator (pipeline.json's ``"generator"``, the key of ``unclip.pipelines.GENERATORS``), its
stages, its settings class and its operations, and implements ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from unclip.checkpoint import (  # STAGE_FILES: what loading a stage may read, so what a saved pipeline copies
    MANIFEST,
    STAGE_FILES,
    resolve_checkpoint,
    verify_stage_files,
    write_json_atomic,
    write_manifest,
)
from unclip.embedding import TextCondition
from unclip.images import to_pil
from unclip.pipeline_inputs import check_count, check_output, check_prompts, check_seed
from unclip.training.precision import sampling_dtype
from unclip.weights import CheckpointError

PIPELINE_FILE = "pipeline.json"
PIPELINE_KEYS = {"format", "stages", "settings", "generator"}


def saved_by(cls=None) -> str:
    """Where a saved pipeline comes from, for the errors of a path that is none."""
    name = f"{cls.__name__}.save_pretrained" if cls else "a pipeline's save_pretrained"
    return f"give a directory saved by {name} (train/demo.py saves outputs/{getattr(cls, 'demo_dir', 'demo')}/pipeline)"


def generator_class(name: str | None):
    """The pipeline class of a generator name (``unclip.pipelines.GENERATORS``; None: the default, which
    pipeline.json files written before "generator" existed are)."""
    from unclip.pipelines import DEFAULT_GENERATOR, pipeline_class  # the registry imports every pipeline

    return pipeline_class(DEFAULT_GENERATOR if name is None else name)


# -- the saved format --------------------------------------------------------------------------------------------
def parse_pipeline_file(manifest_file: Path) -> dict:
    """A ``pipeline.json``'s contents, checked to be a pipeline file: an object with ``stages`` (and ``format``,
    ``settings``, ``generator`` a known one); a CheckpointError naming the file otherwise."""
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_file} is damaged, not JSON ({err}); save the pipeline again") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict) or set(manifest) - PIPELINE_KEYS:
        raise CheckpointError(f"{manifest_file} is not a pipeline file: expected an object with 'stages' (and "
                              f"'format', 'settings'), got {json.dumps(manifest)[:200]}; save the pipeline again")
    try:
        generator_class(manifest.get("generator"))
    except ValueError as err:
        raise CheckpointError(f"{manifest_file} is not a pipeline file: {err}") from None
    return manifest


def stage_entries(stages: dict) -> list[str]:
    """The stage directories a pipeline.json names (its ``stages`` values, ``upsamplers`` a list of them)."""
    names = []
    for value in stages.values():
        names += [v for v in value if isinstance(v, str)] if isinstance(value, list) else [value]
    return [n for n in names if isinstance(n, str)]


def read_pipeline_file(path: Path, cls) -> tuple[dict, object]:
    """A saved ``cls`` pipeline's ``pipeline.json``: its stages (each of ``cls.stages`` present) and its settings
    as ``cls.settings_class``. A pipeline whose save was killed mid-swap is restored first."""
    recover_interrupted_save(path)
    manifest_file = path / PIPELINE_FILE
    if not path.exists():
        raise CheckpointError(f"pipeline {path} does not exist; {saved_by(cls)}, or the stages' checkpoints")
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a saved pipeline: {PIPELINE_FILE} is missing; {saved_by(cls)}, or the "
                              "stages' checkpoints")
    manifest = parse_pipeline_file(manifest_file)
    other = generator_class(manifest.get("generator"))
    saved = other.generator
    if other is not cls:
        raise CheckpointError(f"{path} is a saved {saved!r} pipeline, not a {cls.generator!r} one: load it with "
                              f"{other.__module__}.{other.__name__}.from_pretrained or unclip.pipelines.load_pipeline "
                              f"(jobs: pipeline={saved})")
    stages = manifest["stages"]
    for name in cls.stages:
        if not isinstance(stages.get(name), str):
            raise CheckpointError(f"{manifest_file} lists no {name} stage; save the pipeline again")
        if not (path / stages[name]).exists():
            raise CheckpointError(f"pipeline {path} is missing its {name} stage ({path / stages[name]}); save the "
                                  "pipeline again")
    settings, known = manifest.get("settings", {}), sorted(vars(cls.settings_class()))
    unknown = sorted(set(settings) - set(known)) if isinstance(settings, dict) else settings
    if unknown:
        raise CheckpointError(f"{manifest_file} has unknown settings {unknown}; known: {known}")
    return stages, cls.settings_class(**settings)


def _unexpected_entries(directory: Path) -> list[str]:
    """What in ``directory`` a save would delete that is not a saved pipeline's: everything, unless its
    pipeline.json is a regular file that parses as a pipeline file; then the entries it does not name (its stage
    directories, each holding only stage files)."""
    manifest_file = directory / PIPELINE_FILE
    if not stat.S_ISREG(manifest_file.lstat().st_mode):
        return [f"{PIPELINE_FILE} (not a regular file)"]
    try:
        stages = set(stage_entries(parse_pipeline_file(manifest_file)["stages"]))
    except CheckpointError as err:
        return [f"{PIPELINE_FILE} ({err})"]
    unexpected = []
    for entry in sorted(directory.iterdir()):
        if entry.name == PIPELINE_FILE:
            continue
        if entry.name not in stages or entry.is_symlink() or not entry.is_dir():
            unexpected.append(entry.name + (" (a symbolic link)" if entry.is_symlink() else ""))
            continue
        unexpected += [f"{entry.name}/{f.name}" + (" (a symbolic link)" if f.is_symlink() else "")
                       for f in sorted(entry.iterdir())
                       if f.name not in (*STAGE_FILES, MANIFEST) or f.is_symlink() or not f.is_file()]
    return unexpected


def check_replaceable(directory: Path) -> None:
    """``save_pretrained`` writes a new or empty directory, or replaces a saved pipeline and nothing else."""
    if directory.is_symlink():
        raise FileExistsError(f"cannot save the pipeline to {directory}: it is a symbolic link (to "
                              f"{os.readlink(directory)}); give the directory itself")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot save the pipeline to {directory}: it is a file; choose a directory")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / PIPELINE_FILE).exists() and not (directory / PIPELINE_FILE).is_symlink():
        raise FileExistsError(
            f"cannot save the pipeline to {directory}: it is not empty and not a saved pipeline (no {PIPELINE_FILE}), "
            "and saving would replace everything in it; choose a new or empty directory, or move its files away"
        )
    unexpected = _unexpected_entries(directory)
    if unexpected:
        raise FileExistsError(
            f"cannot save the pipeline to {directory}: saving replaces a saved pipeline whole, and it holds what a "
            f"saved pipeline does not: {', '.join(unexpected[:8])}; choose a new or empty directory, or move those "
            "away"
        )


def _temporaries(directory: Path) -> list[tuple[str, int, Path]]:
    """``save_pipeline``'s siblings of ``directory``: (kind "tmp" or "old", the process id that made it, path)."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(directory.name)}-(\d+)")
    if not directory.parent.is_dir():
        return []
    return [(m[1], int(m[2]), p) for p in directory.parent.iterdir() if (m := pattern.fullmatch(p.name))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def recover_interrupted_save(directory: Path) -> None:
    """A save killed between its two renames leaves no ``directory`` but the old pipeline beside it
    (``.old-<name>-<pid>``): put it back, as the failed save would have left it."""
    if directory.exists() or directory.is_symlink():
        return
    for kind, pid, path in _temporaries(directory):
        if kind == "old" and not _alive(pid) and (path / PIPELINE_FILE).is_file():
            os.replace(path, directory)
            warnings.warn(f"restored the pipeline {directory} from {path.name}, left by a save that was interrupted "
                          f"(process {pid})", stacklevel=3)
            return


def remove_stale_temporaries(directory: Path) -> None:
    """The temporary copies (tens to hundreds of MB) that killed saves of ``directory`` left beside it."""
    for _, pid, path in _temporaries(directory):
        if not _alive(pid) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def save_pipeline(directory: str | Path, sources: dict, settings: dict, generator: str,
                  stage_lists: Sequence[str] = ()) -> Path:
    """Copy every stage of ``sources`` (stage name -> checkpoint; ``upsampler_<i>`` names listed as upsamplers)
    into one directory with a pipeline.json. The directory must be new, empty or a saved pipeline; a saved
    pipeline is replaced only once the new one is complete (written to a temporary sibling, then swapped in), so
    a failed save leaves it as it was, and a save killed between the swap's two renames is undone on the next
    load or save."""
    directory = Path(directory)
    if not sources:
        raise ValueError("save_pretrained needs a pipeline built by from_pretrained (stage checkpoints to copy)")
    recover_interrupted_save(directory)
    check_replaceable(directory)
    remove_stale_temporaries(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_stages(tmp, sources, settings, generator, stage_lists)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _write_stages(target_root: Path, sources: dict, settings: dict, generator: str, stage_lists: Sequence[str]) -> None:
    """Each stage a directory of its name; a ``<list>_<i>`` stage of one of ``stage_lists`` listed under ``<list>s``
    (``upsampler_0`` under ``upsamplers``)."""
    stages: dict = {f"{name}s": [] for name in stage_lists}
    for name, source in sources.items():
        source = resolve_checkpoint(source)
        target = target_root / name
        target.mkdir()
        files = [f for f in STAGE_FILES if (source / f).is_file()]
        for file in files:
            shutil.copy2(source / file, target / file)
        verify_stage_files(source, files, "copy {} into a saved pipeline")  # the copies are checked against the source's manifest, if any
        write_manifest(target)
        listed = name.rpartition("_")[0]
        if listed in stage_lists:
            stages[f"{listed}s"].append(name)
        else:
            stages[name] = name
    write_json_atomic(target_root / PIPELINE_FILE, {"format": 1, "generator": generator, "stages": stages,
                                                    "settings": settings})


def pipeline_directory_generator(path: str | Path) -> str:
    """The generator a saved pipeline directory names (its pipeline.json), checked."""
    path = Path(path)
    recover_interrupted_save(path)
    if not (path / PIPELINE_FILE).is_file():
        raise CheckpointError(f"{path} is not a saved pipeline ({PIPELINE_FILE} is missing); {saved_by()}")
    return generator_class(parse_pipeline_file(path / PIPELINE_FILE).get("generator")).generator


# -- re-ranking ----------------------------------------------------------------------------------------------
def best_of(clip, images: torch.Tensor, text_embeds: torch.Tensor, rerank: int) -> torch.Tensor:
    """CLIP re-ranking: of every ``rerank`` consecutive images [B * rerank, 3, H, W], the one whose CLIP image
    embedding is most similar to its caption's embedding (``text_embeds`` [B * rerank, D], one row per image)."""
    return images[group_best((clip.encode_image(images) * text_embeds.float()).sum(-1), rerank)]


def group_best(scores: torch.Tensor, rerank: int) -> torch.Tensor:
    """The row of the highest score in every ``rerank`` consecutive rows of ``scores`` [B * rerank]: [B] indices."""
    return scores.view(-1, rerank).argmax(dim=1) + torch.arange(0, len(scores), rerank, device=scores.device)


def caption_bank_scores(clip, images: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each image's [N] CLIP similarity to its best-matching caption of ``bank`` (text embeddings [C, D]): how well
    some caption of the bank describes it."""
    return bank_similarity(clip.encode_image(images), bank)


def bank_similarity(image_embeds: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each CLIP image embedding's [N] cosine with its best-matching caption of ``bank`` (text embeddings [C, D])."""
    return (image_embeds.float() @ bank.float().T).max(dim=1).values


def candidate_chunks(rows: int, rerank: int, max_batch: int) -> list[tuple[int, int]]:
    """Candidate rows ``0:rows`` (``rerank`` consecutive ones per image) in runs of at most ``max_batch``: whole
    groups of candidates where a group fits (so that every run is ranked on its own), else each group in parts."""
    if rerank <= max_batch:
        step = max_batch // rerank * rerank
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]
    return [(group + start, min(group + start + max_batch, group + rerank))
            for group in range(0, rows, rerank) for start in range(0, rerank, max_batch)]


class Pipeline:
    """The base of the pipelines. Subclasses set the class attributes below and ``from_pretrained``."""

    generator: ClassVar[str]  # pipeline.json's "generator", the key of unclip.pipelines.GENERATORS
    stages: ClassVar[tuple[str, ...]]  # the stages a saved pipeline must hold
    settings_class: ClassVar[type]
    operations: ClassVar[frozenset[str]]  # the methods that make images, e.g. {"generate", "inpaint"}
    demo_dir: ClassVar[str]  # where train/demo.py trains it (outputs/<demo_dir>)
    autocast_dtype: ClassVar[torch.dtype | None] = torch.bfloat16  # the precision it samples in where the
    # device computes it natively (float32 elsewhere: autocast()); None: float32
    stage_lists: ClassVar[tuple[str, ...]] = ()  # stages of which it has a list (``upsampler``: ``upsamplers``)
    # settings that act against a prompt, each with its no-op value: ``unconditional`` ignores them
    no_prompt_settings: ClassVar[dict[str, object]] = {}
    # of those, the ones a caption bank gives something to rank by (unconditional(captions=...))
    bank_settings: ClassVar[tuple[str, ...]] = ()

    settings: object
    sources: dict

    # -- what it is ------------------------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [getattr(self, name) for name in self.stages]

    @classmethod
    def supports(cls, *operations: str) -> bool:
        """Whether the pipeline can do each of ``operations`` (e.g. ``pipe.supports("inpaint")``)."""
        return set(operations) <= cls.operations

    @classmethod
    def require(cls, operation: str, asked_by: str = "") -> None:
        """Nothing if the pipeline can do ``operation``; else a ValueError naming what it can do."""
        if not cls.supports(operation):
            raise ValueError(f"{asked_by or operation} needs a pipeline that can {operation}; {cls.__name__} "
                             f"({cls.generator}) can: {', '.join(sorted(cls.operations))}")

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs (its CLIP's device)."""
        return getattr(self.clip, "device", None) or next(self.clip.parameters()).device

    def to(self, device):
        for module in self.modules():
            module.to(device)
        return self

    def autocast(self):
        """The pipeline's precision (``autocast_dtype`` on CPU and CUDA where the device computes it natively:
        ``unclip.training.precision.sampling_dtype``; float32 elsewhere), for code that calls its stages directly
        (the evaluators' CLIP scores) as the pipeline does."""
        dtype = sampling_dtype(self.device.type, self.autocast_dtype)
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    # -- construction and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs):
        raise NotImplementedError

    @classmethod
    def from_config(cls, spec: dict, **kwargs):
        """From a ``conf/pipeline/`` node: ``path`` (a saved pipeline) or else its stage checkpoints (by
        ``from_pretrained``'s names), with ``settings`` over the pipeline's settings."""
        if spec.get("path"):
            pipe = cls.from_pretrained(spec["path"], **kwargs)
        else:
            pipe = cls.from_pretrained(**cls.stage_spec(spec), **kwargs)
        pipe.settings = pipe._settings(spec.get("settings") or {})
        return pipe

    @classmethod
    def stage_spec(cls, spec: dict) -> dict:
        """``from_pretrained``'s stage arguments from a ``conf/pipeline/`` node."""
        return {name: spec.get(name) for name in cls.stages}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Copy every stage (weights, config, space) into one directory with a pipeline.json. The directory must
        be new, empty or a saved pipeline (its pipeline.json a regular file naming everything there); a saved
        pipeline is replaced only once the new one is complete (written to a temporary sibling, then swapped in),
        so a failed save leaves it as it was."""
        return save_pipeline(directory, self.sources, vars(self.settings), self.generator, self.stage_lists)

    # -- one call's settings, seed and output ----------------------------------------------------------
    def _settings(self, overrides: dict, check: Callable | None = None):
        """The pipeline's settings with ``overrides`` over them, checked (by ``check``, else ``_check_settings``)."""
        unknown = set(overrides) - set(vars(self.settings))
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(vars(self.settings))}")
        settings = self.settings_class(**{**vars(self.settings), **overrides})
        (check or self._check_settings)(settings)
        return settings

    def _check_settings(self, settings) -> None:
        settings.check()

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(check_seed(seed))

    def _prepare(self, seed: int, overrides: dict, output: str = "pil"):
        """One call's settings (checked) and generator, every argument of them checked before any work."""
        check_output(output)
        return self._settings(overrides), self._generator(seed)

    @staticmethod
    def _output(images: torch.Tensor, output: str):
        check_output(output)
        images = images.float()
        return to_pil(images) if output == "pil" else images

    @staticmethod
    def _joined(parts: list, output: str):
        return torch.cat(parts) if output == "tensor" else [image for part in parts for image in part]

    # -- prompts ---------------------------------------------------------------------------------
    def _check_prompts(self, prompts, name: str = "prompts") -> list[str]:
        """``check_prompts``, and each prompt must leave a token once the CLIP's tokenizer has cleaned it (an
        empty caption would be the unconditional one)."""
        prompts = check_prompts(prompts, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too long: the encoding warns again
            end = int(self.clip.tokenize([""])[0, 1])
            empty = [p for p, tokens in zip(prompts, self.clip.tokenize(prompts)) if int(tokens[1]) == end]
        if empty:
            raise ValueError(f"the prompt {empty[0]!r} ({name}) has no words the CLIP's tokenizer keeps (it removes "
                             "whitespace, control characters and special tokens); give a prompt with words")
        return prompts

    def _encode_text(self, prompts: list[str], max_batch: int) -> TextCondition:
        """The CLIP's encoding of ``prompts``, ``max_batch`` at a time."""
        parts = [self.clip.encode_text(prompts[i:i + max_batch]) for i in range(0, len(prompts), max_batch)]
        if len(parts) == 1:
            return parts[0]
        return TextCondition(*(torch.cat([getattr(p, f) for p in parts]) for f in
                               ("embed", "tokens", "token_embeds", "mask")))

    # -- images without a prompt ------------------------------------------------------------------
    @torch.no_grad()
    def unconditional(self, n: int = 1, *, seed: int = 0, rerank: int = 1, captions: Sequence[str] | None = None,
                      output: str = "pil", **settings):
        """``n`` images drawn without any prompt: every stage conditioned on its learned null caption (what caption
        dropout trained), so the images follow the training data's distribution as the model learned it. Made
        ``settings.max_batch`` at a time (the first chunk's images are those of a request for only them). Settings
        that compare with a prompt (``no_prompt_settings``: the prompt's re-ranking, guidance) have nothing to act
        on: the pipeline's own are ignored and one given here other than its no-op value is an error (but see
        ``bank_settings``).

        ``rerank=k`` with ``captions`` (a caption bank: the training captions, or any that describe the images
        wanted) draws k candidates per image and keeps the one the CLIP finds most similar to its best-matching
        caption of the bank: DALL-E's CLIP re-ranking with the bank standing in for the missing prompt. It trades
        diversity for realism (docs/results.md#unconditional-generation measures both); candidates are ranked
        before the upsamplers, so only the kept ones are upsampled. With a bank, the unCLIP pipeline also takes
        ``prior_candidates=m``: each candidate's image embedding is the best of m prior samples by the bank (its
        similarity to the best-matching caption), before anything is decoded."""
        if isinstance(n, (str, list, tuple)):
            raise TypeError(f"unconditional takes a number of images, not prompts (got {n!r:.60}); for images of "
                            "prompts call generate(prompts, n)")
        count = check_count("n", n)
        rerank = check_count("rerank", rerank)
        for name, no_op in self.no_prompt_settings.items():
            if name in settings and settings[name] != no_op and not (captions is not None and name in self.bank_settings):
                ranks = "; with a caption bank (captions=) it ranks by the bank" if name in self.bank_settings else ""
                raise ValueError(f"unconditional samples have no prompt, so {name}={settings[name]!r} has nothing to "
                                 f"act on (it compares candidates or guidance with a prompt){ranks}; leave it out")
        ranked_by_bank = [name for name in self.bank_settings if settings.get(name, self.no_prompt_settings[name])
                          != self.no_prompt_settings[name]]
        # the pipeline's own (prompted) values of these are not used: only those given here
        settings = {**{name: no_op for name, no_op in self.no_prompt_settings.items()}, **settings}
        if rerank > 1 and captions is None:
            raise ValueError(f"unconditional samples have no prompt to re-rank by, so rerank={rerank} needs a caption "
                             "bank to compare with: captions=[...] (e.g. the training captions)")
        if captions is not None and rerank == 1 and not ranked_by_bank:
            uses = " or ".join(["rerank=k > 1", *(f"{name} > 1" for name in self.bank_settings)])
            raise ValueError(f"captions= is the bank unconditional samples are re-ranked by; it needs {uses} (leave "
                             "captions out for no re-ranking)")
        bank_captions = None if captions is None else self._check_prompts(captions, "captions")
        config, generator = self._prepare(seed, settings, output)
        self._check_unconditional()
        with self.autocast():
            bank = None if bank_captions is None else self._caption_bank(bank_captions, config.max_batch)
            return self._keep_best(
                count * rerank, rerank, config, output,
                lambda start, stop: (self._unconditional_candidates(stop - start, config, generator, bank), None),
                lambda images, _: caption_bank_scores(self.clip, images, bank),
                lambda images: self._unconditional_finish(images, config, generator))

    def _caption_bank(self, captions: list[str], max_batch: int) -> torch.Tensor:
        """The CLIP text embeddings [C, D] of the distinct ``captions``, ``max_batch`` at a time."""
        distinct = sorted(set(captions))
        return torch.cat([self.clip.encode_text(distinct[i:i + max_batch]).embed.float()
                          for i in range(0, len(distinct), max_batch)])

    def _check_unconditional(self) -> None:
        """An error naming the stage that cannot sample without a prompt (e.g. one trained without caption
        dropout), before any work."""

    def _unconditional_candidates(self, count: int, config, generator, bank: torch.Tensor | None) -> torch.Tensor:
        """``count`` images [count, 3, S, S] in [-1, 1] without a prompt, as they are ranked (before any upsampler);
        ``bank``: the caption bank's text embeddings [C, D] when re-ranking (None: none)."""
        raise NotImplementedError

    def _unconditional_finish(self, images: torch.Tensor, config, generator) -> torch.Tensor:
        """What the kept candidates become (the unCLIP pipeline's: upsampled)."""
        return images

    # -- images per prompt, re-ranked ------------------------------------------------------------------
    def _ranked_images(self, prompts: list[str], count: int, config, output: str,
                       draw: Callable, finish: Callable | None = None):
        """``count`` images per prompt, in prompt order, ``config.max_batch`` candidates at a time; of every
        ``config.rerank`` candidates the one the CLIP finds most similar to its prompt is kept (ranked in parts,
        keeping the best so far, when they outnumber ``max_batch``).

        ``draw(text, first_row)``: candidate images for ``text`` (the prompts' TextCondition, one row per candidate,
        encoded ``max_batch`` prompts at a time); ``finish(images)``: what the kept images become (e.g. upsampled)."""
        per_prompt = count * config.rerank

        def draw_rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            prompt_index = torch.arange(start, stop) // per_prompt
            first = int(prompt_index[0])
            text = self.clip.encode_text(prompts[first:int(prompt_index[-1]) + 1])
            text = text[(prompt_index - first).to(text.embed.device)]
            return draw(text, start), text.embed

        return self._keep_best(len(prompts) * per_prompt, config.rerank, config, output, draw_rows,
                               lambda images, embeds: (self.clip.encode_image(images) * embeds.float()).sum(-1),
                               finish)

    def _keep_best(self, rows: int, rerank: int, config, output: str, draw: Callable, score: Callable,
                   finish: Callable | None = None):
        """Candidate rows ``0:rows``, ``rerank`` consecutive ones per image, drawn ``config.max_batch`` at a time
        (``draw(start, stop) -> (images, context)``); of every ``rerank`` the one of the highest
        ``score(images, context)`` [stop - start] is kept (ranked in parts, keeping the best so far, when a group
        outnumbers ``max_batch``); ``finish(kept)`` is what the kept images become (e.g. upsampled)."""
        parts, best = [], None
        for start, stop in candidate_chunks(rows, rerank, config.max_batch):
            images, context = draw(start, stop)
            images = images.float()
            if rerank == 1:
                kept = images
            else:
                scores = score(images, context)
                if stop - start >= rerank:  # whole groups of candidates
                    kept = images[group_best(scores, rerank)]
                else:  # a part of one image's candidates
                    top = int(scores.argmax())
                    if best is None or scores[top] > best[0]:
                        best = (scores[top], images[top:top + 1])
                    if stop % rerank:
                        continue
                    kept, best = best[1], None
            parts.append(self._output(finish(kept) if finish else kept, output))
        return self._joined(parts, output)


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, max_batch: int) -> torch.Tensor:
    """``fn`` of ``rows`` (a tensor), ``max_batch`` rows at a time, concatenated."""
    return torch.cat([fn(rows[i:i + max_batch]) for i in range(0, len(rows), max_batch)])

