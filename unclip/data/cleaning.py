"""Turn raw image files and captions into clean items, or a :class:`BadItem` saying why not.

Every data source decodes through :func:`load_image` and :func:`clean_caption`. Both return, beside the
result, a dict of issue counts: the normalisations applied (``mode_converted``, ``exif_rotated``,
``non_utf8_caption``, ``mojibake_fixed``, ``control_chars_stripped``, ``caption_truncated``). A sample that
cannot be used raises ``BadItem(reason)``; the reasons are the ``*_REASONS`` below.
"""

from __future__ import annotations

import io
import os
import stat
import unicodedata
import warnings
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Mapping

import ftfy
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from unclip.images import to_rgb, to_tensor

MIN_SIZE = 16  # pixels: images whose shorter side is smaller are refused ("image_too_small")
# Pixels decoded at most (~100 MB as RGB, e.g. 5792 x 5792). Big JPEGs are decoded at 1/2, 1/4 or 1/8
# scale (Image.draft) first, so only the reduced size counts; other formats above it are refused
# ("image_too_large") without being decoded. PIL's own decompression-bomb limit applies as well.
MAX_PIXELS = 2**25
MAX_CAPTION_CHARS = 1000
IMAGE_REASONS = ("unreadable_file", "not_a_file", "corrupt_image", "truncated_image", "image_too_small",
                 "image_too_large", "unsupported_mode")
CAPTION_REASONS = ("missing_caption", "empty_caption")

# Fix broken encodings only: curly quotes, ligatures and full-width characters are left as written.
_FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False, fix_latin_ligatures=False, fix_character_width=False)
_ENCODING_ACTIONS = ("encode", "decode", "transcode")
_ENCODING_FIXERS = ("decode_inconsistent_utf8", "restore_byte_a0", "replace_lossy_sequences", "fix_c1_controls")


class BadItem(Exception):
    """A sample that cannot be used; ``reason`` is a short snake_case name for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def readable_name(name: str | os.PathLike) -> str:
    """A file name as printable text on one line: bytes of it that are not UTF-8 (which Python keeps as lone
    surrogates, and which no log or JSON file can hold) and control characters (a newline, a terminal's escape
    sequences) written as ``\\xNN``."""
    text = os.fspath(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in text)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (links followed), else BadItem.

    A FIFO, socket or device is refused ("not_a_file") without being opened: opening a FIFO for reading waits
    for a writer forever. The open itself does not block either, should the file be swapped for a FIFO
    between the check and the open.
    """
    name = readable_name(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadItem("not_a_file", f"{name} is not a regular file (a FIFO, socket, device or folder)")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise BadItem("unreadable_file", f"{name}: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadItem("not_a_file", f"{name} is not a regular file (a FIFO, socket, device or folder)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def add_issues(total: dict[str, int], more: Mapping[str, int]) -> dict[str, int]:
    """Add the counts of ``more`` into ``total`` (in place) and return it."""
    for reason, count in more.items():
        total[reason] = total.get(reason, 0) + count
    return total


# ----------------------------------------------------------------------------------------------------
# images


def load_image(source: str | Path | bytes, image_size: int, *, max_pixels: int = MAX_PIXELS,
               min_size: int = MIN_SIZE) -> tuple[torch.Tensor, dict[str, int]]:
    """Decode an image file (path or bytes) to float32 [3, S, S] in [-1, 1], and its issue counts.

    Any mode becomes RGB (alpha composited on white, 16-bit and float images scaled, not clipped); EXIF
    orientation is applied; the shorter side is resized to ``image_size`` and the centre cropped.
    Raises BadItem for unreadable, corrupt, truncated, too small (shorter side < ``min_size``) or too
    large (more than ``max_pixels`` to decode) images.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = "<bytes>" if is_bytes else readable_name(source)
    stream = io.BytesIO(source) if is_bytes else open_regular(source)
    issues: Counter[str] = Counter()
    with stream, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit here
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")  # e.g. "corrupt EXIF data"
        try:
            array = _decode(stream, image_size, max_pixels, min_size, issues)
        except BadItem as bad:
            raise BadItem(bad.reason, f"{name}: {bad.detail}") from None
        except Image.DecompressionBombError as err:
            raise BadItem("image_too_large", f"{name}: {err}") from None
        except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
            reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
            raise BadItem(reason, f"{name}: {type(err).__name__}: {err}") from None
    return to_tensor(array), dict(issues)


def _decode(stream, image_size: int, max_pixels: int, min_size: int, issues: Counter) -> np.ndarray:
    image = Image.open(stream)
    width, height = image.size
    if min(width, height) < min_size:
        raise BadItem("image_too_small", f"{width}x{height} pixels, shorter side below min_size={min_size}")
    image.draft(image.mode, (image_size, image_size))  # JPEG: decode at the smallest scale still >= S
    if image.width * image.height > max_pixels:
        raise BadItem("image_too_large", f"{width}x{height} pixels, more than max_pixels={max_pixels}")
    image.load()
    image = _apply_orientation(image, issues)
    image = _to_rgb(image, issues)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side), reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def _apply_orientation(image: Image.Image, issues: Counter) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        return image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image
    issues["exif_rotated"] += 1
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image, issues: Counter) -> Image.Image:
    """RGB by ``unclip.images.to_rgb`` (alpha on white, 16-bit as 0..65535), counted as ``mode_converted``."""
    if image.mode == "RGB":
        return image
    issues["mode_converted"] += 1
    try:
        return to_rgb(image)
    except ValueError as err:  # a mode PIL cannot convert to RGB (e.g. LAB)
        raise BadItem("unsupported_mode", f"mode {image.mode!r}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# captions


def clean_caption(raw: str | bytes | None, *, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str, dict[str, int]]:
    """A caption as one line of clean text, and its issue counts.

    Bytes are read as UTF-8, else as cp1252 / latin-1 ("non_utf8_caption"); mojibake is repaired with
    ftfy ("mojibake_fixed"); control characters are dropped and whitespace runs become one space; a
    caption longer than ``max_chars`` is cut at a word boundary ("caption_truncated"). Raises
    BadItem("missing_caption") for None and BadItem("empty_caption") when nothing is left.
    """
    if raw is None:
        raise BadItem("missing_caption")
    issues: Counter[str] = Counter()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            issues["non_utf8_caption"] += 1
            try:
                text = raw.decode("cp1252")
            except UnicodeDecodeError:  # bytes cp1252 leaves undefined
                text = raw.decode("latin-1")
    elif isinstance(raw, str):
        text = raw
    else:
        raise TypeError(f"a caption must be str, bytes or None, got {type(raw).__name__}: {raw!r}")
    if len(text) > 16 * max_chars:  # bound the work on garbage; the result is cut to max_chars below
        text = text[: 16 * max_chars]
    if any(_is_control(ch) for ch in text):
        issues["control_chars_stripped"] += 1
    fixed = ftfy.fix_and_explain(text, _FTFY_CONFIG)
    if any(action in _ENCODING_ACTIONS or parameter in _ENCODING_FIXERS
           for action, parameter in fixed.explanation or ()):
        issues["mojibake_fixed"] += 1
    text = " ".join("".join(ch for ch in fixed.text if not _is_control(ch)).split())
    if not text:
        raise BadItem("empty_caption", f"{raw[:40]!r} is empty after cleaning")
    if len(text) > max_chars:
        issues["caption_truncated"] += 1
        cut = text[: max_chars + 1].rfind(" ")
        text = text[:cut] if cut >= max_chars // 2 else text[:max_chars]
    return text, dict(issues)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc" and not ch.isspace()
