"""The jobs' one meeting point with Hydra: ``@hydra_job("train_x")`` turns ``main(job: Job)`` into a Hydra app.

It also registers the structured configs, so that their dataclasses state every default once:
``trainer/schema`` (``unclip.training.TrainerConfig``, named by conf/trainer/default.yaml) and
``generation/defaults`` (``unclip.pipeline.GenerationSettings``) and ``dalle_generation/defaults``
(``unclip.dalle_pipeline.DalleSettings``). A value of the wrong type
(``trainer.lr=abc``, ``trainer.max_steps=2.5``) or an unknown key is then an error naming the setting.
"""

from __future__ import annotations

import functools
from typing import Callable

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from unclip.dalle_pipeline import DalleSettings
from unclip.jobs import Job, start_job
from unclip.pipeline import GenerationSettings
from unclip.training import TrainerConfig

ConfigStore.instance().store(group="trainer", name="schema", node=TrainerConfig)
ConfigStore.instance().store(group="generation", name="defaults", node=GenerationSettings)
ConfigStore.instance().store(group="dalle_generation", name="defaults", node=DalleSettings)


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
