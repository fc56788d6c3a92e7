"""Which pipeline a ``conf/pipeline/`` node builds: its ``generator`` (``unclip``, the default: UnCLIPPipeline;
``dalle``: DallePipeline), so that the sample and evaluate jobs take either (`pipeline=dalle`)."""

from __future__ import annotations

from unclip.dalle_pipeline import DallePipeline
from unclip.pipeline import UnCLIPPipeline

GENERATORS = {"unclip": UnCLIPPipeline, "dalle": DallePipeline}


def pipeline_from_config(spec: dict, **kwargs):
    """The pipeline of a ``conf/pipeline/`` node (see each class's ``from_config``)."""
    generator = spec.get("generator", "unclip")
    if generator not in GENERATORS:
        raise ValueError(f"pipeline.generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    return GENERATORS[generator].from_config(spec, **kwargs)
