"""The GLIDE-style decoder stage, the upsampler stage, and their networks (UNet, caption encoders)."""

from unclip.decoder.decoder import Decoder
from unclip.decoder.text_encoder import CaptionEncoder, ClipTokenProjection
from unclip.decoder.unet import UNet
from unclip.decoder.upsampler import Upsampler

__all__ = ["CaptionEncoder", "ClipTokenProjection", "Decoder", "UNet", "Upsampler"]
