"""Data sets and sources, each giving items {"image", "caption", "meta"} (plus "issues" for real files):

``shapes`` (the embedded procedural default, docs/data.md), ``emoji`` (rendered from the Noto Color Emoji font),
image folders and webdataset tar shards (with dirty-data cleaning, :mod:`unclip.data.cleaning`), and the
CLIP embedding shards the prior trains on (:mod:`unclip.data.embeddings`).
"""

from .collate import collate_dicts, first_items
from .embeddings import EmbeddingShards, write_embedding_shards
from .emoji import EmojiDataset
from .folder import ImageFolderDataset
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
from .webdataset_shards import WebDatasetSource

__all__ = [
    "EmbeddingShards",
    "EmojiDataset",
    "ImageFolderDataset",
    "WebDatasetSource",
    "collate_dicts",
    "first_items",
    "write_embedding_shards",
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
