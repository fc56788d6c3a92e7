"""Components that say how to rebuild themselves, and the registry of what a config may build.

``@configurable`` on a class records the arguments every instance was constructed with (defaults applied,
tuples as lists) as ``instance.config == {"_target_": "module.Class", **arguments}``; ``unclip.config.build``
turns that back into an equal instance (a stage checkpoint's ``config.json`` holds it). ``@register`` only
lets configs build the class (data sets, evaluators: built from YAML, never saved). ``unclip.config.build``
builds registered classes and refuses everything else, so a config read from disk cannot call a function.

A class whose saved config must differ from the arguments it was given (a weights file whose weights the
checkpoint holds anyway, a default resolved at construction) defines ``_rebuild_arguments(self, given)``,
returning the arguments that rebuild it.
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, TypeVar

T = TypeVar("T", bound=type)

_REGISTERED: set[type] = set()


def register(cls: T) -> T:
    """Let configs build ``cls`` (``unclip.config.build`` refuses every class not registered)."""
    _REGISTERED.add(cls)
    return cls


def is_registered(obj: Any) -> bool:
    return isinstance(obj, type) and obj in _REGISTERED


def configurable(cls: T | None = None, *, target: str | None = None):
    """Class decorator: record ``.config`` (``_target_`` is ``target`` or ``module.Class``) and register."""

    def decorate(cls: T) -> T:
        init = cls.__init__
        signature = inspect.signature(init)
        name = target or f"{cls.__module__}.{cls.__qualname__}"

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            given = _arguments(signature, self, args, kwargs)
            init(self, *args, **kwargs)
            if type(self) is cls:  # a subclass records its own arguments (or has no config)
                rebuild = getattr(self, "_rebuild_arguments", None)
                arguments = rebuild(given) if rebuild is not None else given
                self.__dict__["_config"] = {"_target_": name, **plain(arguments)}

        cls.__init__ = __init__
        cls.config = property(_config, doc="The config that rebuilds this object: unclip.config.build(config).")
        return register(cls)

    return decorate if cls is None else decorate(cls)


def _arguments(signature: inspect.Signature, instance, args: tuple, kwargs: dict) -> dict:
    bound = signature.bind(instance, *args, **kwargs)
    bound.apply_defaults()
    arguments: dict = {}
    for index, (key, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[key].kind
        if index == 0:  # self
            continue
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"@configurable cannot record *{key}; give {type(instance).__name__} named arguments")
        else:
            arguments[key] = value
    return copy.deepcopy(plain(arguments))


def _config(self) -> dict:
    config = self.__dict__.get("_config")
    if config is None:
        raise TypeError(f"{type(self).__qualname__} is not @configurable itself (only a base class is); it has no config")
    return copy.deepcopy(config)


def plain(value: Any) -> Any:
    """Tuples to lists and mappings (also OmegaConf's) to dicts, recursively: JSON-ready config values."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): plain(v) for k, v in value.items()}
    return value
