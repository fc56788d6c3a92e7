"""The text-to-image pipelines: unCLIP (``UnCLIPPipeline``: CLIP -> prior -> decoder -> upsamplers) and DALL-E 1
(``DallePipeline``: CLIP tokens -> transformer -> dVAE), over one base (``unclip.pipelines.base.Pipeline``).

``GENERATORS`` is the one registry of them, keyed by the name a saved pipeline's ``pipeline.json`` and a
``conf/pipeline/`` node give as ``generator``; ``load_pipeline`` opens a saved pipeline of either kind and
``pipeline_from_config`` builds a config node's. Ask a pipeline what it can do with ``pipe.supports("inpaint")``.
"""

from __future__ import annotations

from pathlib import Path

from unclip.pipelines.base import PIPELINE_FILE, Pipeline, best_of, pipeline_directory_generator
from unclip.pipelines.dalle import DallePipeline, DalleSettings
from unclip.pipelines.unclip import DEFAULT_JUMPS, GenerationSettings, UnCLIPPipeline, slerp

GENERATORS: dict[str, type[Pipeline]] = {cls.generator: cls for cls in (UnCLIPPipeline, DallePipeline)}
DEFAULT_GENERATOR = UnCLIPPipeline.generator  # a conf/pipeline/ node or pipeline.json that names none


def pipeline_class(generator: str) -> type[Pipeline]:
    """The pipeline class of a generator name; a ValueError naming the known ones otherwise."""
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    return GENERATORS[generator]


def pipeline_from_config(spec: dict, **kwargs) -> Pipeline:
    """The pipeline of a ``conf/pipeline/`` node: its ``generator``'s class ``from_config``."""
    try:
        cls = pipeline_class(spec.get("generator", DEFAULT_GENERATOR))
    except ValueError as err:
        raise ValueError(f"pipeline.{err}") from None
    return cls.from_config(spec, **kwargs)


def load_pipeline(path: str | Path, **kwargs) -> Pipeline:
    """A saved pipeline of any kind, by the generator its ``pipeline.json`` names (``from_pretrained`` kwargs)."""
    return pipeline_class(pipeline_directory_generator(path)).from_pretrained(path, **kwargs)


__all__ = ["DEFAULT_JUMPS", "GENERATORS", "PIPELINE_FILE", "DallePipeline", "DalleSettings", "GenerationSettings",
           "Pipeline", "UnCLIPPipeline", "best_of", "load_pipeline", "pipeline_class", "pipeline_from_config", "slerp"]
