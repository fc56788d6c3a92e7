"""A model that can say how to rebuild itself: ``model.config`` -> ``unclip.config.build(config)``."""

from __future__ import annotations

import copy


class Configurable:
    """Mixin for stage models: call ``self.remember_config(**init_kwargs)`` in ``__init__``."""

    def remember_config(self, **kwargs) -> None:
        self._init_kwargs = {k: _plain(v) for k, v in kwargs.items()}

    @property
    def config(self) -> dict:
        cls = type(self)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **copy.deepcopy(self._init_kwargs)}


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
