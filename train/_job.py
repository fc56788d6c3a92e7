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
(``unclip.run_lock``) when the run starts, so that a read-only or busy directory is an error naming it, not a
failure inside Hydra's logging setup or a rewritten ``.hydra/`` of another run.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.conf import HydraConf
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from unclip.jobs import Job, start_job
from unclip.pipelines import DalleSettings, GenerationSettings, pipeline_class
from unclip.run_lock import DirectoryInUseError, hold_directory
from unclip.training import TrainerConfig


class RunDirectoryCallback(Callback):
    """Before Hydra creates the run directory and writes into it: fix its name (a ``${now:...}`` in it is read
    once), try it for writing and hold it (the main process of a multi-process launch) until the run ends."""

    def __init__(self) -> None:
        self._held = ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        directory = Path(str(config.hydra.run.dir))
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(directory)
        if int(os.environ.get("RANK", "0")) != 0:  # accelerate's other processes share the main one's directory
            return
        try:
            self._held.enter_context(hold_directory(directory, f"train/{config.hydra.job.name}.py"))
        except PermissionError as err:  # Hydra turns a callback's exceptions into warnings: end the run here
            sys.exit(f"Error: {err}; e.g. hydra.run.dir=<a writable directory>")
        except DirectoryInUseError as err:
            sys.exit(f"Error: {err} (hydra.run.dir=...)")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()


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
            main(start_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir))

        return hydra.main(version_base=None, config_path="../conf", config_name=config_name)(task)

    return decorate


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
