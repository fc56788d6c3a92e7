"""Build objects from config dictionaries, allowing only registered classes.

Configs are data: a mapping with ``_target_`` (a dotted path) and keyword arguments, possibly nested.
Hydra's ``instantiate`` would build anything importable; a config read from disk (a checkpoint) must not be
able to name ``os.system`` or a function of this package that writes files. So every ``_target_`` of the
whole tree must name a class marked ``@configurable`` or ``@register`` (``unclip.configurable``), checked
before anything is built; everything else is refused with its name. The loader imports modules of the unclip
package only: a registered class elsewhere (a stage being written in a user's own module) is found only once
its module has been imported.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any, Mapping

from unclip.configurable import is_registered

ALLOWED_PREFIX = "unclip."  # modules the loader may import
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class ConfigError(ValueError):
    """A config that cannot be built: its arguments do not fit the class it names."""


class UnsafeConfigError(ConfigError):
    """A config names something that may not be built from a config."""


def check_targets(config: Any, where: str = "config", overrides: Mapping | None = None) -> None:
    """Raise UnsafeConfigError unless every ``_target_`` in ``config`` names a registered class, and a
    ConfigError unless its arguments (with ``overrides`` for the outermost one) fit that class."""
    if isinstance(config, Mapping):
        if "_target_" in config:
            cls = locate(config["_target_"], where)
            _check_arguments(cls, [k for k in config if k != "_target_"] + list(overrides or {}), where)
        for key, value in config.items():
            check_targets(value, f"{where}.{key}")
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, f"{where}[{i}]")


def locate(target: Any, where: str = "config") -> type:
    """The registered class ``unclip.a.b.Name`` names (importing its module), or UnsafeConfigError."""
    refusal = (
        f"{where} names _target_ {target!r}; only classes of the unclip package registered for configs "
        "(@configurable / @register in unclip.configurable) may be built from a config"
    )
    if not isinstance(target, str) or not _DOTTED.match(target):
        raise UnsafeConfigError(refusal)
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name) if target.startswith(ALLOWED_PREFIX) else sys.modules[module_name]
        found = getattr(module, attr)
    except (ImportError, AttributeError, KeyError) as err:
        raise UnsafeConfigError(f"{refusal}; and it names nothing that exists: {err!r}") from err
    if not is_registered(found):
        raise UnsafeConfigError(f"{refusal}; it names a {type(found).__name__}, not a registered class")
    return found


def _check_arguments(cls: type, names: list[str], where: str) -> None:
    signature = inspect.signature(cls)
    try:
        signature.bind(**dict.fromkeys(names))
    except TypeError as err:
        raise ConfigError(
            f"{where} builds {cls.__qualname__}: {err.args[0]}; it takes: {', '.join(signature.parameters)}"
        ) from None


def build(config: Any, **overrides: Any) -> Any:
    """Recursively build every mapping that has a ``_target_``; other values pass through.

    ``overrides`` are keyword arguments for the outermost target (values a job computes, e.g. widths).
    Every target and its arguments are checked before anything is built; a config saved by an older version is
    first put in today's form (see ``upgraded``)."""
    config = upgraded(config)
    check_targets(config, overrides=overrides)
    return _build(config, overrides)


def upgraded(config: Any) -> Any:
    """``config`` with each target's arguments in today's form: a class whose arguments moved (a saved
    checkpoint's config.json still has them where they were) defines the classmethod
    ``_upgrade_arguments(arguments) -> arguments``. Targets that cannot be built are left for ``check_targets``
    to refuse, with the place they stand at."""
    if isinstance(config, (list, tuple)):
        return [upgraded(v) for v in config]
    if not isinstance(config, Mapping):
        return config
    config = {k: upgraded(v) for k, v in config.items()}
    try:
        upgrade = getattr(locate(config["_target_"]), "_upgrade_arguments", None) if "_target_" in config else None
    except UnsafeConfigError:
        return config
    if upgrade is None:
        return config
    return {"_target_": config["_target_"], **upgrade({k: v for k, v in config.items() if k != "_target_"})}


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
