"""Text-to-image quality of a whole pipeline on `shapes` prompts, judged from the pixels."""

from __future__ import annotations

from unclip.eval.judge import judge_batch, score
from unclip.images import from_pil


def evaluate_text_to_image(pipe, captions: list[str], metas: list[dict], *, seed: int = 0, batch_size: int = 64,
                           prefix: str = "", **settings) -> dict:
    """Generate one image per caption and judge it against the caption's metadata.

    Keys (prefixed): colour_shape_acc, colour_acc, shape_acc, size_acc / position_acc (where the caption
    named them), pair_acc (both objects and the relation right), and their counts.
    """
    judgements = []
    for start in range(0, len(captions), batch_size):
        images = pipe.generate(captions[start : start + batch_size], seed=seed + start, **settings)
        judgements += judge_batch(from_pil(images))
    result = score(judgements, metas)
    return {f"{prefix}{key}": value for key, value in result.items()}
