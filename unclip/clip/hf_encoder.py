"""A ClipEncoder backed by a transformers ``CLIPModel`` saved in a local directory (never downloaded)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from unclip.clip.base import ClipEncoderBase
from unclip.clip.open_clip_encoder import OPENAI_MEAN, OPENAI_STD
from unclip.configurable import configurable
from unclip.embedding import EmbeddingSpace, TextCondition, fingerprint_of
from unclip.weights import CheckpointError

# The architecture numbers that, with the weights and the tokenizer, define the space. Other fields of a
# transformers config (its version, defaults added by later releases) do not change the fingerprint.
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps")
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps")
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@configurable(target="unclip.clip.HFClipEncoder")
class HFClipEncoder(ClipEncoderBase):
    """CLIP text and image encoders from a transformers ``CLIPModel`` directory (``save_pretrained`` layout).

    ``path`` must hold ``config.json``, the weights (unless ``load_weights=False``) and the tokenizer files
    (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``); everything is read with ``local_files_only=True``.
    The image mean and std come from ``preprocessor_config.json`` when present, else CLIP's (OpenAI's)
    defaults; ``image_mean`` / ``image_std`` override both. ``config`` rebuilds the architecture, tokenizer
    and preprocessing from ``path`` without its weights (they come from the stage checkpoint), so the
    directory must stay where it is for as long as a stage saved from this encoder is used.
    """

    def __init__(
        self,
        path: str,
        name: str = "",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        load_weights: bool = True,
    ):
        super().__init__()
        directory = Path(path).expanduser().resolve()
        _check_directory(directory, load_weights)
        self.path = str(directory)
        self.name = name or directory.name
        from transformers import CLIPConfig, CLIPModel  # here: importing transformers takes seconds (torchvision)

        try:
            if load_weights:
                model = CLIPModel.from_pretrained(directory, local_files_only=True)
            else:
                model = CLIPModel(CLIPConfig.from_pretrained(directory, local_files_only=True))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"cannot load a transformers CLIPModel from {directory}: {err}") from err
        self.model = model.float()
        text, vision = self.model.config.text_config, self.model.config.vision_config
        self.context_length = int(text.max_position_embeddings)
        self.image_size = int(vision.image_size)
        self.tokenizer = _load_tokenizer(directory, int(text.vocab_size))
        special = sorted(self.tokenizer.all_special_tokens, key=len, reverse=True)
        self.special = re.compile("|".join(re.escape(s) for s in special), re.IGNORECASE)
        mean, std = _image_normalisation(directory)
        self._set_normalisation(image_mean if image_mean is not None else mean, image_std if image_std is not None else std)

    # -- config and space ---------------------------------------------------------------------
    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config rebuilds the architecture, tokenizer and preprocessing from ``path``, without its
        weights (they come from the stage checkpoint)."""
        return {**given, "path": self.path, "name": self.name, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "load_weights": False}

    def compute_space(self) -> EmbeddingSpace:
        """Describe the joint space, fingerprinting the current weights (cached as ``space``).

        The fingerprint covers the architecture, tokenizer vocabulary, image normalisation and weights, not
        the directory's path or the encoder's name: the same model copied elsewhere is the same space.
        """
        config = self.model.config
        vocab = json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()
        identity = {
            "kind": "transformers.CLIPModel",
            "projection_dim": int(config.projection_dim),
            "text": {k: getattr(config.text_config, k) for k in _TEXT_KEYS},
            "vision": {k: getattr(config.vision_config, k) for k in _VISION_KEYS},
            "tokenizer_vocab": hashlib.sha256(vocab).hexdigest(),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        self._space = EmbeddingSpace(
            dim=int(config.projection_dim),
            text_length=self.context_length,
            token_dim=int(config.text_config.hidden_size),
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            fingerprint=fingerprint_of(identity, self.model.state_dict()),
            name=self.name,
        )
        return self._space

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, T], padded to the model's context. A longer caption is truncated with a warning."""
        texts = self._captions(texts)
        self._warn_truncated(texts, [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]])
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]

    def _special_ids(self) -> tuple[int, int]:
        return self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> TextCondition:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        device = self.device
        tokens = tokens.to(device=device, dtype=torch.long)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"token ids must be [B, {self.context_length}], got {tuple(tokens.shape)}")
        # Real tokens: everything up to and including the first end token (padding repeats it).
        is_end = tokens == self.tokenizer.eos_token_id
        end = torch.where(is_end.any(-1), is_end.int().argmax(-1), tokens.shape[1] - 1)
        mask = torch.arange(tokens.shape[1], device=device)[None, :] <= end[:, None]
        out = self.model.text_model(input_ids=tokens, attention_mask=mask.long(), return_dict=True)
        embed = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
        # last_hidden_state is after the final layer norm
        return TextCondition(embed=embed, tokens=tokens, token_embeds=out.last_hidden_state, mask=mask)

    # -- images -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images.to(self.device))
        pooled = self.model.vision_model(pixel_values=pixels, return_dict=True).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)


def _check_directory(directory: Path, load_weights: bool) -> None:
    """Fail early, naming the path, when the directory cannot hold a complete CLIPModel."""
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"transformers CLIP directory {directory} {problem} (nothing is downloaded)")
    config = directory / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected a CLIPModel saved with save_pretrained")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{config} is not a readable JSON config: {err}") from err
    if model_type != "clip":
        raise CheckpointError(f"{config} describes a {model_type!r} model, expected a 'clip' CLIPModel")
    if load_weights and not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise CheckpointError(f"{directory} has no weights (*.safetensors or *.bin) next to its config.json")
    if not any(all((directory / name).is_file() for name in names) for names in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory} has no tokenizer files: expected tokenizer.json or vocab.json + merges.txt"
        )


def _load_tokenizer(directory: Path, vocab_size: int):
    """A ``transformers.CLIPTokenizerFast`` from the directory, checked."""
    from transformers import CLIPTokenizerFast

    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot load the CLIP tokenizer from {directory}: {err}") from err
    # Without usable files transformers may return a tokenizer of just its special tokens; never run with that.
    if len(tokenizer) != vocab_size:
        raise CheckpointError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's text vocab_size is "
            f"{vocab_size}; the tokenizer files (tokenizer.json or vocab.json + merges.txt) are missing, "
            "damaged or of another model"
        )
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"the tokenizer in {directory} has no end-of-text token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _image_normalisation(directory: Path) -> tuple[Sequence[float], Sequence[float]]:
    if not (directory / "preprocessor_config.json").is_file():
        return OPENAI_MEAN, OPENAI_STD
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot read {directory}/preprocessor_config.json: {err}") from err
    return processor.image_mean, processor.image_std


__all__ = ["HFClipEncoder"]
