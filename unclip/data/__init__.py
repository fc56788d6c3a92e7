"""Data sets: ``shapes``, the embedded procedural default (see SHAPES.md)."""

from .shapes import (
    COLOURS,
    DEFAULT_HELDOUT,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ShapeObject,
    ShapesDataset,
    ShapesItem,
    class_prompts,
    collate,
    generate_item,
    render,
    write_folder,
)

__all__ = [
    "COLOURS",
    "DEFAULT_HELDOUT",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "ShapeObject",
    "ShapesDataset",
    "ShapesItem",
    "class_prompts",
    "collate",
    "generate_item",
    "render",
    "write_folder",
]
