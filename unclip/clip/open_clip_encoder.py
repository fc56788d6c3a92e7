"""A ClipEncoder backed by any open_clip architecture (random init, our checkpoint, or a local file)."""

from __future__ import annotations

import copy
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from unclip.clip.base import ClipEncoderBase, strip_special
from unclip.configurable import configurable, plain
from unclip.embedding import EmbeddingSpace, TextCondition, fingerprint_of
from unclip.weights import CheckpointError, load_weights_file

# The tokenizer turns these strings into its special tokens wherever they appear in a caption (also
# HTML-escaped): a caption must not be able to end itself early.
_SPECIAL = re.compile(r"<\s*/?\s*(start|end)_of_text\s*>", re.IGNORECASE)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@configurable(target="unclip.clip.OpenClipEncoder")
class OpenClipEncoder(ClipEncoderBase):
    """CLIP text and image encoders from open_clip, returning per-token text states as well.

    Give either ``model_name`` (one of ``open_clip.list_models()``) or ``model_cfg`` (an open_clip model
    config: ``embed_dim``, ``vision_cfg``, ``text_cfg``; the tiny ones live in ``conf/clip/``).
    ``checkpoint`` optionally names a local open_clip weights file (.pt, .bin or .safetensors).
    Nothing is ever downloaded.
    """

    # The Trainer runs this model's training steps (forward, backward, any recomputation) with the CPU's math
    # attention kernel: its flash kernel's backward was 45% of a demo CLIP step (unclip.attention_kernels).
    math_attention_on_cpu = True

    def __init__(
        self,
        model_name: str | None = None,
        model_cfg: dict | None = None,
        checkpoint: str | None = None,
        name: str = "",
        image_mean: Sequence[float] = OPENAI_MEAN,
        image_std: Sequence[float] = OPENAI_STD,
    ):
        super().__init__()
        if (model_name is None) == (model_cfg is None):
            raise ValueError("give exactly one of model_name (an open_clip architecture) or model_cfg")
        if model_name is not None:
            model_cfg = _named_model_config(model_name)
        model_cfg = plain(model_cfg)
        self.model_name = model_name
        self.model_cfg = model_cfg
        self.checkpoint = checkpoint
        self.name = name or model_name or "open_clip"
        self.model = _open_clip().CLIP(**copy.deepcopy(model_cfg))
        if checkpoint is not None:
            state = load_weights_file(checkpoint)
            state = state.get("state_dict", state)  # open_clip's training checkpoints wrap the weights
            state = {k.removeprefix("module."): v for k, v in state.items()}
            try:
                missing, unexpected = self.model.load_state_dict(state, strict=False)
            except RuntimeError as err:  # tensors of the wrong shape
                first = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
                raise CheckpointError(
                    f"checkpoint {checkpoint} does not fit the architecture {self.name}: {first} ..."
                ) from err
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint {checkpoint} does not fit the architecture {self.name}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.context_length = int(model_cfg["text_cfg"].get("context_length", 77))
        self.tokenizer = _open_clip().tokenizer.SimpleTokenizer(context_length=self.context_length)
        vision = model_cfg["vision_cfg"]
        size = vision.get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.special = _SPECIAL
        self._set_normalisation(image_mean, image_std)

    # -- config and space ---------------------------------------------------------------------
    def _rebuild_arguments(self, given: dict) -> dict:
        """The saved config rebuilds the architecture (a named model as its config); the weights come from the
        stage checkpoint, never again from the file."""
        del given["model_name"], given["checkpoint"]
        return {**given, "model_cfg": copy.deepcopy(self.model_cfg), "name": self.name,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    def compute_space(self) -> EmbeddingSpace:
        """Describe the joint space, fingerprinting the current weights (cached as ``space``)."""
        text = self.model_cfg["text_cfg"]
        self._space = EmbeddingSpace(
            dim=int(self.model_cfg["embed_dim"]),
            text_length=self.context_length,
            token_dim=int(text.get("width", 512)),
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            fingerprint=fingerprint_of(self.config, self.model.state_dict()),
            name=self.name,
        )
        return self._space

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, T]. A caption longer than the context is truncated with a warning."""
        texts = self._captions(texts)
        self._warn_truncated(texts, [len(self.tokenizer.encode(t)) + 2 for t in texts])
        return self.tokenizer(texts)

    def _special_ids(self) -> tuple[int, int]:
        return self.tokenizer.sot_token_id, self.tokenizer.eot_token_id

    def _decode_ids(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> TextCondition:
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        device = self.device
        tokens = tokens.to(device)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"token ids must be [B, {self.context_length}], got {tuple(tokens.shape)}")
        out = self.model.forward_intermediates(
            text=tokens, text_indices=1, normalize=False, normalize_intermediates=True
        )
        token_embeds = out["text_intermediates"][-1]  # [B, T, Dt] after the final layer norm
        embed = F.normalize(out["text_features"].float(), dim=-1)
        # Real tokens: everything up to and including the end token (the highest id in each row).
        end = tokens.argmax(dim=-1, keepdim=True)
        mask = torch.arange(tokens.shape[1], device=device)[None, :] <= end
        return TextCondition(embed=embed, tokens=tokens, token_embeds=token_embeds, mask=mask)

    # -- images -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(self.preprocess(images.to(self.device)))
        return F.normalize(features.float(), dim=-1)


def _open_clip():
    """open_clip, imported when a model is built: importing it takes about 3 s (torchvision, torch._dynamo), which
    every job start would pay, also the many that never build a CLIP (the prior's, the dVAE's, a refused one)."""
    import open_clip

    return open_clip


def _plain_text(text: str) -> str:
    """A caption with open_clip's special-token strings removed (after undoing HTML escapes)."""
    return strip_special(text, _SPECIAL)


def _named_model_config(model_name: str) -> dict:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model_name {model_name!r}: nothing is fetched from a hub; name an open_clip architecture and give "
            "the weights as a local file with checkpoint=..."
        )
    open_clip = _open_clip()
    known = open_clip.list_models()
    if model_name not in known:
        raise ValueError(f"unknown open_clip model {model_name!r}; known models: {', '.join(known)}")
    cfg = open_clip.get_model_config(model_name)
    if cfg.get("text_cfg", {}).get("hf_model_name") or "hf_tokenizer_name" in cfg.get("text_cfg", {}):
        raise ValueError(
            f"open_clip model {model_name!r} uses a Hugging Face text tower, which would be downloaded; "
            "use a transformers CLIPModel from a local directory instead"
        )
    if cfg.get("custom_text") or "multimodal_cfg" in cfg:
        raise ValueError(f"open_clip model {model_name!r} is not a plain CLIP; it is not supported here")
    return cfg


__all__ = ["OpenClipEncoder"]
