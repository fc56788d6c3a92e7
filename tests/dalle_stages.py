"""Tiny real DALL-E 1 stages for tests: a micro CLIP (tokenizer and re-ranking), a dVAE and a transformer."""

from __future__ import annotations

import torch
from conftest import MICRO_CLIP

from unclip.autoregressive import TextImageTransformer, TextVocabulary
from unclip.checkpoint import save_stage
from unclip.clip import OpenClipEncoder
from unclip.data.shapes import ShapesDataset
from unclip.dvae import DiscreteVAE
from unclip.pipelines.dalle import end_token_id

TINY_DVAE = {"image_size": 16, "grid_size": 4, "codebook_size": 32, "codebook_dim": 8, "channels": [16, 16]}
TINY_TRANSFORMER = {"width": 32, "depth": 1, "heads": 2, "text_length": 16}


def shapes_captions(n: int = 48) -> list[str]:
    data = ShapesDataset("train", length=n, image_size=16, pair_fraction=0.5)
    return [data[i]["caption"] for i in range(n)]


def tiny_transformer(clip, dvae, **overrides) -> TextImageTransformer:
    end_id = end_token_id(clip)
    vocabulary = TextVocabulary.from_token_rows(clip.tokenize(shapes_captions()), end_id)
    return TextImageTransformer(text_vocab=vocabulary.source_ids.tolist(), text_end_id=end_id,
                                image_vocab_size=dvae.codebook_size, image_length=dvae.grid_size**2,
                                **{**TINY_TRANSFORMER, **overrides})


def dalle_stages(seed: int = 0, **dvae_overrides):
    torch.manual_seed(seed)
    clip = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")
    dvae = DiscreteVAE(**{**TINY_DVAE, **dvae_overrides})
    return clip, dvae, tiny_transformer(clip, dvae)


def save_dalle_stages(root, seed: int = 0, **dvae_overrides) -> dict:
    """The three stages saved as checkpoints under ``root``: {"clip": dir, "dvae": dir, "transformer": dir}."""
    clip, dvae, transformer = dalle_stages(seed, **dvae_overrides)
    return {
        "clip": save_stage(root / "clip", clip, stage="clip", space=clip.space),
        "dvae": save_stage(root / "dvae", dvae, stage="dvae", space=None),
        "transformer": save_stage(root / "transformer", transformer, stage="dalle", space=None),
    }
