"""Build objects from config dictionaries, allowing only classes of this package.

Configs are data: a mapping with ``_target_`` (a dotted path) and keyword arguments, possibly nested.
Hydra's ``instantiate`` would build anything importable; a config read from disk (a checkpoint) must not
be able to name ``os.system``, so this builder refuses every target outside the ``unclip`` package.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

ALLOWED_PREFIX = "unclip."


class UnsafeConfigError(ValueError):
    """A config names something outside the unclip package."""


def check_targets(config: Any, where: str = "config") -> None:
    """Raise UnsafeConfigError if any ``_target_`` in ``config`` lies outside the package."""
    if isinstance(config, Mapping):
        target = config.get("_target_")
        if target is not None:
            if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX) or ".." in target:
                raise UnsafeConfigError(
                    f"{where} names _target_ {target!r}; only classes of the unclip package "
                    f"(starting with {ALLOWED_PREFIX!r}) may be built from a config"
                )
        for key, value in config.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, f"{where}[{i}]")


def locate(target: str) -> Any:
    """Import ``unclip.a.b.Name`` and return ``Name``."""
    check_targets({"_target_": target})
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot find _target_ {target!r}: {err}") from err


def build(config: Any, **overrides: Any) -> Any:
    """Recursively build every mapping that has a ``_target_``; other values pass through."""
    check_targets(config)
    return _build(config, overrides)


def _build(config: Any, overrides: dict | None = None) -> Any:
    if isinstance(config, Mapping):
        kwargs = {k: _build(v) for k, v in config.items() if k != "_target_"}
        if overrides:
            kwargs.update(overrides)
        if "_target_" not in config:
            return kwargs
        return locate(config["_target_"])(**kwargs)
    if isinstance(config, (list, tuple)):
        return [_build(v) for v in config]
    return config
