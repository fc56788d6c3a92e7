"""The jobs' one meeting point with Hydra: ``@hydra_job("train_x")`` turns ``main(job: Job)`` into a Hydra app.

It also registers the structured configs, so that their dataclasses state every default once:
``trainer/schema`` (``unclip.training.TrainerConfig``, named by conf/trainer/default.yaml) and
``generation/defaults`` (``unclip.pipelines.GenerationSettings``) and ``dalle_generation/defaults``
(``unclip.pipelines.DalleSettings``). A value of the wrong type
(``trainer.lr=abc``, ``trainer.max_steps=2.5``) or an unknown key is then an error naming the setting. The resolver
``${demo_dir:<generator>}`` gives a pipeline class's ``demo_dir`` (conf/demo.yaml's ``out``), so that the generator
names live in ``unclip.pipelines.GENERATORS`` alone.

And it makes every job own its run directory before Hydra writes anything there (``.hydra/``, the job's log):
:class:`RunDirectoryCallback`, added to Hydra's own config, tries the directory for writing and takes its lock
(``unclip.run_lock.run_directory``, the one way a run directory is owned) when the run starts, in a single run
and in a multirun alike, so that a read-only or busy directory is an error naming it, not a failure inside Hydra's
logging setup or a rewritten ``.hydra/`` of another run. Only the other processes of a multi-process launch
(torchrun, ``accelerate launch``) leave it to the main one; a bare ``RANK`` in the environment does not count.
A symlink where Hydra writes next (``.hydra/``, the job log) is replaced first, never written through.
"""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.conf import HydraConf
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from unclip.files import replace_link, write_atomic
from unclip.jobs import Job, start_job
from unclip.pipelines import DalleSettings, GenerationSettings, pipeline_class
from unclip.run_lock import DirectoryInUseError, run_directory
from unclip.training import TrainerConfig


class RunDirectoryCallback(Callback):
    """Before Hydra creates a job's directory and writes into it: fix its name (a ``${now:...}`` in it is read
    once), try it for writing and hold it (``unclip.run_lock.run_directory``) until the run ends.

    A single run is held in ``on_run_start``. A multirun (``-m``) holds its sweep directory in
    ``on_multirun_start`` and each job's directory in ``on_job_start``, which Hydra calls only after writing a
    job's ``.hydra/``: so a multirun's jobs leave ``.hydra/`` to this callback, which writes it once the job holds
    its directory (a refused job must not rewrite a live run's ``.hydra/``)."""

    def __init__(self) -> None:
        self._held = ExitStack()
        self._job = ExitStack()
        self._multirun = False
        self._file_log: dict | None = None  # a multirun's job log handler: opened here
        self._output_subdir: str | None = None  # a multirun's .hydra/ name, written here

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        directory = Path(str(config.hydra.run.dir))
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(directory)
        _hold(self._held, directory, config, "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _hold(self._held, Path(str(config.hydra.sweep.dir)), config, "hydra.sweep.dir")
        self._multirun, self._output_subdir = True, config.hydra.output_subdir
        deferred = ["hydra.output_subdir=null"]  # .hydra/ and the job log: written here, once the job holds its dir
        handlers = OmegaConf.select(config, "hydra.job_logging.root.handlers") or []
        file_log = OmegaConf.select(config, "hydra.job_logging.handlers.file")
        if "file" in handlers and file_log is not None:  # Hydra would open it (appending) before on_job_start
            self._file_log = OmegaConf.to_container(file_log, resolve=False)
            deferred += ["~hydra.job_logging.handlers.file",
                         f"hydra.job_logging.root.handlers=[{','.join(h for h in handlers if h != 'file')}]"]
        with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):  # every job's config is
            config.hydra.overrides.hydra.extend(deferred)  # composed again with these

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._multirun:
            return
        directory = Path(str(config.hydra.runtime.output_dir))
        _hold(self._job, directory, config, "hydra.sweep.dir=... hydra.sweep.subdir")
        if self._file_log is not None:
            handler = _job_log_handler(config, self._file_log)
            logging.getLogger().addHandler(handler)
            self._job.callback(logging.getLogger().removeHandler, handler)
            self._job.callback(handler.close)
        if self._output_subdir is not None:
            task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            for name, node in (("config.yaml", task), ("hydra.yaml", OmegaConf.masked_copy(config, ["hydra"])),
                               ("overrides.yaml", config.hydra.overrides.task)):
                write_atomic(directory / self._output_subdir / name, OmegaConf.to_yaml(node))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._job.close()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()


def _job_log_handler(config: DictConfig, file_spec: dict) -> logging.Handler:
    """The file handler of Hydra's job logging (``<job dir>/<job>.log``), as Hydra would have made it, put back
    into the job's config (``file_spec``, unresolved: its file name is the job's)."""
    with read_write(config.hydra), open_dict(config.hydra.job_logging.handlers):
        config.hydra.job_logging.handlers.file = file_spec
    spec = OmegaConf.to_container(config.hydra.job_logging, resolve=True)
    file = spec["handlers"]["file"]
    formatter = spec.get("formatters", {}).get(file.get("formatter"), {})
    handler = logging.FileHandler(file["filename"], mode=file.get("mode", "a"), encoding=file.get("encoding"))
    handler.setFormatter(logging.Formatter(formatter.get("format"), formatter.get("datefmt")))
    return handler


def _hold(stack: ExitStack, directory: Path, config: DictConfig, setting: str) -> None:
    """Hold ``directory`` on ``stack`` for this job (the main process of a multi-process launch), and replace any
    symlink where Hydra writes next (its job log, ``.hydra/``), so that nothing is written through one; a
    directory that cannot be held ends the run (Hydra turns a callback's exceptions into warnings)."""
    try:
        held = stack.enter_context(run_directory(directory, f"train/{config.hydra.job.name}.py"))
    except PermissionError as err:
        sys.exit(f"Error: {err}; e.g. {setting}=<a writable directory>")
    except DirectoryInUseError as err:
        sys.exit(f"Error: {err} ({setting}=...)")
    replace_link(held / f"{config.hydra.job.name}.log")
    subdir = config.hydra.output_subdir
    if subdir is not None:
        replace_link(held / str(subdir))
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            replace_link(held / str(subdir) / name)


ConfigStore.instance().store(group="trainer", name="schema", node=TrainerConfig)
ConfigStore.instance().store(group="generation", name="defaults", node=GenerationSettings)
ConfigStore.instance().store(group="dalle_generation", name="defaults", node=DalleSettings)
OmegaConf.register_new_resolver("demo_dir", lambda generator: pipeline_class(generator).demo_dir, replace=True)
ConfigStore.instance().store(group="hydra", name="config", provider="hydra", node=HydraConf(
    callbacks={"run_directory": {"_target_": f"{__name__}.RunDirectoryCallback"}}))


def hydra_job(config_name: str) -> Callable[[Callable[[Job], None]], Callable[[], None]]:
    """``main(job)`` as a Hydra app over ``conf/<config_name>.yaml``: the run directory Hydra chose, the config
    as plain data, seeded (see ``unclip.jobs.start_job``)."""

    def decorate(main: Callable[[Job], None]) -> Callable[[], None]:
        @functools.wraps(main)  # Hydra names the job and finds conf/ from the wrapped function's file
        def task(cfg: DictConfig) -> None:
            refuse_added_keys(cfg)
            keep_only_given_settings_of_a_saved_pipeline(cfg, HydraConfig.get().overrides.task)
            main(start_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir))
            end_process_group()

        return hydra.main(version_base=None, config_path="../conf", config_name=config_name)(task)

    return decorate


def end_process_group() -> None:
    """Leave a multi-process launch's process group (``accelerate launch``, torchrun) once the job is done. Left to
    the interpreter's exit, gloo's worker threads could be torn down while still joinable: the process then aborted
    ("terminate called without an active exception", SIGABRT) after a finished run, failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no process leaves while another still talks to it
        dist.destroy_process_group()


def refuse_added_keys(cfg: DictConfig) -> None:
    """``+key=value`` may add an argument to a node that builds a class (``_target_``: its signature is checked
    when it is built) or choose a config group; anything else would add a setting that nothing reads."""
    hydra_cfg = HydraConfig.get()
    for override in hydra_cfg.overrides.task:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key in hydra_cfg.runtime.choices or key.startswith("hydra."):
            continue
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not (OmegaConf.is_dict(node) and "_target_" in node):
            known = ", ".join(str(k) for k in node if k != key.rpartition(".")[2]) if OmegaConf.is_dict(node) else "none"
            raise ValueError(
                f"{override}: {key!r} is not a setting of this job, nothing would read it. Settings "
                f"there: {known}. Drop the '+' to change an existing setting (`--cfg job` prints them all)."
            )


def given_settings(overrides, prefix: str) -> set[str]:
    """The keys below ``prefix`` (e.g. ``"pipeline.settings."``) that the command-line ``overrides`` set."""
    return {o.lstrip("+~").split("=", 1)[0][len(prefix):] for o in overrides if o.lstrip("+~").startswith(prefix)}


def keep_only_given_settings_of_a_saved_pipeline(cfg: DictConfig, overrides) -> None:
    """``pipeline.path=DIR`` samples with the settings saved in DIR/pipeline.json; only the
    ``pipeline.settings.*`` the command line gives replace them. (The node's other settings are the composed
    defaults, which would silently replace a saved pipeline's tuned steps, samplers and re-ranking.)"""
    node = cfg.get("pipeline")
    if not (OmegaConf.is_dict(node) and node.get("path") and OmegaConf.is_dict(node.get("settings"))):
        return
    given = given_settings(overrides, "pipeline.settings.")
    settings = OmegaConf.to_container(node.settings, resolve=True)
    with open_dict(cfg):
        cfg.pipeline.settings = {key: value for key, value in settings.items() if key in given}


def choice(group: str) -> str:
    """The option this run chose for a config group (e.g. ``choice("data") == "folder"``)."""
    return HydraConfig.get().runtime.choices[group]


def forwarded_overrides(*groups: str) -> list[str]:
    """This run's choices for the config ``groups`` and the command-line settings inside them (``data=folder``,
    ``data.root=DIR``): what another job needs to see the same data (the demo's stages)."""
    hydra_cfg = HydraConfig.get()
    chosen = [f"{group}={hydra_cfg.runtime.choices[group]}" for group in groups]
    settings = [o for o in hydra_cfg.overrides.task if o.lstrip("+~").split("=")[0].split(".")[0] in groups and
                "." in o.split("=")[0]]
    return chosen + settings
