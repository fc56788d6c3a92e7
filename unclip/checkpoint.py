"""Save and load a stage: a self-describing checkpoint directory.

A stage checkpoint is a directory holding

* ``model.safetensors``: the trained weights; ``ema.safetensors``: their EMA (optional);
* ``config.json``: ``{"format", "stage", "model": <config that rebuilds the model>, ...}``;
* ``space.json``: the EmbeddingSpace the stage lives in;
* ``manifest.json``: every file's size and sha256, checked before anything reads them: a resume (every file),
  :func:`load_stage` (``config.json``, ``space.json`` and the weights it reads). A file the manifest lists that is
  missing, and a file a load reads that the manifest does not list (added since), are refused; so is a manifest
  listing no files. A checkpoint saved before manifests existed (no ``manifest.json``) loads unverified;
* during training also ``trainer/`` (accelerate's state) and ``trainer.json`` for exact resume.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so a
crash mid-save leaves the previous checkpoint intact. Loading reads JSON and safetensors only and builds
the model through :func:`unclip.config.build`, which refuses classes outside this package.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_model
from torch import nn

from unclip.config import ConfigError, build
from unclip.embedding import EmbeddingSpace
from unclip.weights import CheckpointError, load_weights_file

FORMAT_VERSION = 1
LATEST = "latest"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.json"  # in a training checkpoint: where the run stood (step, data stream, EMA)
MANIFEST = "manifest.json"  # in a checkpoint: {"files": {relative path: {"size", "sha256"}}}
STAGE_FILES = ("config.json", "space.json", "model.safetensors", "ema.safetensors")  # what loading a stage may read


@dataclass
class LoadedStage:
    model: nn.Module
    config: dict
    space: EmbeddingSpace | None
    path: Path


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def save_stage_files(
    directory: Path,
    model: nn.Module,
    *,
    stage: str,
    space: EmbeddingSpace | None,
    ema_model: nn.Module | None = None,
    extra: dict | None = None,
) -> None:
    """Write a stage's files into an existing (temporary) directory. Not atomic by itself."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "_target_" not in config:
        raise TypeError(f"{type(model).__name__} has no .config dict with a _target_; cannot save it as a stage")
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    if ema_model is not None:
        save_model(ema_model, str(directory / "ema.safetensors"))
    meta = {"format": FORMAT_VERSION, "stage": stage, "model": config, **(extra or {})}
    (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    if space is not None:
        (directory / "space.json").write_text(json.dumps(space.to_dict(), indent=2))


def commit_directory(tmp: Path, final: Path) -> None:
    """Atomically put ``tmp`` at ``final`` (replacing an older ``final``)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_stage(directory: str | Path, model: nn.Module, **files) -> Path:
    """Save a stage checkpoint atomically to ``directory``: the files of :func:`save_stage_files` (``stage``,
    ``space``, optionally ``ema_model`` and ``extra``) with their manifest, swapped in whole."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_stage_files(tmp, model, **files)
    write_manifest(tmp)
    commit_directory(tmp, final)
    return final


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file under ``directory`` in its ``manifest.json``."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json_atomic(directory / MANIFEST, {"format": 1, "files": files})


def _unlisted(directory: Path, expected: dict, only: Sequence[str] | None) -> dict[str, str]:
    """Files a load would read (``only``, else every file a resume reads) that exist but the manifest lacks."""
    if only is None:  # a resume reads the stage's files, trainer.json and all of trainer/ (accelerate's state)
        only = [*STAGE_FILES, TRAINER_STATE, *(p.relative_to(directory).as_posix()
                                                for p in sorted((directory / "trainer").rglob("*")) if p.is_file())]
    return {name: f"not in {MANIFEST} (added or replaced since it was written)"
            for name in only if name not in expected and (directory / name).is_file()}


def manifest_problems(directory: Path, only: Sequence[str] | None = None) -> dict[str, str] | None:
    """The files of ``directory`` (those named in ``only``, if given) that differ from its manifest, by relative
    path: what is wrong with each ({} if none); None if the checkpoint has no manifest (saved before they existed).
    Missing files the manifest lists, and files read that it does not list, are problems; a manifest listing no
    files is damaged (it would verify nothing)."""
    manifest_file = directory / MANIFEST
    if not manifest_file.exists():
        return None
    try:
        files = json.loads(manifest_file.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
        if not expected:
            raise ValueError("it lists no files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{manifest_file} is damaged ({type(err).__name__}: {err}), so the checkpoint cannot be verified; "
            f"delete {manifest_file} to load its files unverified (as from a checkpoint saved before manifests "
            "existed), or use an earlier checkpoint"
        ) from err
    problems = _unlisted(directory, expected, only)
    for name, (size, digest) in expected.items():
        if only is not None and name not in only:
            continue
        path = directory / name
        if not path.is_file():
            problems[name] = "missing"
        elif path.stat().st_size != size:
            problems[name] = f"{path.stat().st_size} bytes where {size} were written (truncated or replaced)"
        elif _sha256(path) != digest:
            problems[name] = "changed since it was written (its sha256 differs)"
    return problems


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def write_latest(checkpoints: str | Path, name: str) -> None:
    """Point ``checkpoints/latest`` at the checkpoint ``name``, atomically (a crash leaves the old pointer)."""
    checkpoints = Path(checkpoints)
    tmp = checkpoints / f".{LATEST}.tmp{os.getpid()}"
    tmp.write_text(name)
    os.replace(tmp, checkpoints / LATEST)


def read_latest(checkpoints: str | Path, *, needs: str = "config.json") -> Path | None:
    """The checkpoint ``checkpoints/latest`` names (None without a pointer); it must hold the file ``needs``."""
    latest = Path(checkpoints) / LATEST
    if not latest.is_file():
        return None
    target = Path(checkpoints) / latest.read_text().strip()
    if not (target / needs).is_file():
        kind = "training checkpoint" if needs == TRAINER_STATE else "checkpoint"
        raise CheckpointError(f"{latest} points at {target}, which is not a complete {kind}")
    return target


def save_run_checkpoint(run_dir: str | Path, model: nn.Module, *, stage: str, space: EmbeddingSpace | None,
                        extra: dict | None = None) -> Path:
    """Save a stage that trains nothing (an imported CLIP, a baseline prior) as a run directory's checkpoint
    ``step-00000000``, with ``latest`` naming it, as a trained stage's run directory would have it."""
    checkpoints = Path(run_dir) / CHECKPOINTS
    path = save_stage(checkpoints / checkpoint_name(0), model, stage=stage, space=space, extra=extra)
    write_latest(checkpoints, path.name)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A stage checkpoint directory from itself, a run directory or a ``checkpoints/`` directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a stage checkpoint, or the run directory of a "
                              "trained stage (train that stage first, e.g. python train/clip.py)")
    if (path / "config.json").is_file():
        return path
    for candidate in (path, path / CHECKPOINTS):
        try:
            target = read_latest(candidate)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; write the name of a complete checkpoint (a step-* directory beside it) "
                                  "into it, or give a checkpoint directory itself") from err
        if target is not None:
            return target
    raise CheckpointError(
        f"{path} is not a stage checkpoint: expected config.json there, or a run directory with "
        f"{CHECKPOINTS}/{LATEST}"
    )


def verify_stage_files(directory: Path, files: Sequence[str], doing: str = "load {}") -> None:
    """Refuse a stage whose ``files`` differ from its manifest (where it has one), naming each and the way out;
    ``doing`` says what was refused (``cannot load {directory}``)."""
    problems = manifest_problems(directory, files)
    if problems:
        details = "; ".join(f"{directory / name} is {problem}" for name, problem in problems.items())
        raise CheckpointError(
            f"cannot {doing.format(directory)}, it is damaged: {details}. Use an intact copy instead: an earlier checkpoint of its run "
            f"(write its name into the run's {CHECKPOINTS}/{LATEST}), or save the pipeline again from its stages"
        )


CONFIG_FILES = ("config.json", "space.json")  # what read_stage_config reads, verified first


def read_stage_config(path: str | Path) -> tuple[Path, dict, EmbeddingSpace | None]:
    """A stage's directory, config and embedding space, its ``config.json`` and ``space.json`` verified against
    its manifest first (a listed ``space.json`` that is missing is an error, not a stage without a space)."""
    directory = resolve_checkpoint(path)
    verify_stage_files(directory, CONFIG_FILES)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory}/config.json is damaged: {err}") from err
    if not isinstance(config, dict) or "model" not in config or "stage" not in config:
        raise CheckpointError(f"{directory}/config.json is not a unclip stage config (no 'stage'/'model')")
    space = None
    if (directory / "space.json").is_file():
        try:
            space = EmbeddingSpace.from_dict(json.loads((directory / "space.json").read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{directory}/space.json is damaged: {err}") from err
    return directory, config, space


def load_stage(
    path: str | Path,
    *,
    stage: str | None = None,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedStage:
    """Rebuild a stage's model from its checkpoint (EMA weights when present and ``use_ema``); weights that differ
    from the stage's manifest (where it has one) are refused, naming the file."""
    directory, config, space = read_stage_config(path)
    if stage is not None and config["stage"] != stage:
        raise CheckpointError(f"{directory} is a {config['stage']!r} checkpoint, expected a {stage!r} one")
    try:
        model = build(config["model"])
    except ConfigError as err:
        raise CheckpointError(f"refusing to load {directory / 'config.json'}: {err}") from err
    weights = directory / "ema.safetensors"
    if not (use_ema and weights.is_file()):
        weights = directory / "model.safetensors"
    try:  # a missing EMA file its manifest lists is an error too
        verify_stage_files(directory, ["ema.safetensors"] * use_ema + [weights.name])
        damaged = None
    except CheckpointError as err:
        damaged = err
    try:
        state = load_weights_file(weights)
        _load_state(model, state, weights, directory)
    except CheckpointError as err:  # what does not load or fit, and why (the manifest's finding) if it knows
        raise CheckpointError(f"{err}. {damaged}" if damaged else str(err)) from err
    if damaged is not None:
        raise damaged
    _warn_non_finite(state, weights)
    return LoadedStage(model=model.to(map_location), config=config, space=space, path=directory)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, directory: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of the wrong shape
        raise CheckpointError(f"{weights} does not fit the model in {directory}/config.json: {err}") from err
    shared_ok = set(_shared_tensor_names(model))
    missing = [k for k in missing if k not in shared_ok]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit the model in {directory}/config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _warn_non_finite(state: dict[str, torch.Tensor], weights: Path) -> None:
    """NaN or infinite weights load, but make black or noise images: say which file and tensors hold them."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        warnings.warn(f"{weights} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}); the model will make meaningless output. Load an earlier "
                      "checkpoint, or train again from one before the values went bad", RuntimeWarning, stacklevel=3)


def _shared_tensor_names(model: nn.Module) -> list[str]:
    """Names of tensors that alias another one (safetensors' save_model keeps only one of each group)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel():
            groups.setdefault(tensor.data_ptr(), []).append(name)
    return [name for names in groups.values() if len(names) > 1 for name in names]
