"""The ``emoji`` data set: the colour emoji of Noto Color Emoji, captioned with their English names.

Nothing is downloaded. The images come from the font file (Debian/Ubuntu: ``fonts-noto-color-emoji``),
the captions from the ``emoji`` package (its CLDR short names, e.g. ``:woman_surfing_light_skin_tone:``,
made readable: "woman surfing: light skin tone"; its aliases are extra captions).

Kept are the fully-qualified emoji of Emoji version <= 15.0 that the font draws as one colour glyph:
sequences the font does not support fall apart into several glyphs (wider than one glyph) and missing
glyphs draw as ``.notdef``; both are dropped. ``val`` holds out a fixed ~10% of the emoji, chosen by a
SHA-256 of the package's name of the emoji, so the split is the same on every machine.

Rendering: the font's only bitmap strike (109 pt, 136 x 128 px) drawn on a transparent canvas, laid on
white, cropped to the glyph's opaque bounding box plus a margin, centred on a white square (aspect
kept) and resized with Lanczos. All kept emoji are rendered together on first use (about a second per
thousand at 64 px), kept in memory and cached on disk in ``~/.cache/unclip/emoji/`` (``cache_dir``, which
must exist, or ``$UNCLIP_EMOJI_CACHE`` override), keyed on the font file's size and mtime, the ``emoji``
package version and the image size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from unclip.configurable import register
from unclip.data.caption_noise import CaptionNoise, others_of
from unclip.images import to_tensor

from .shapes import check_image_size

log = logging.getLogger(__name__)

FONT_FILE = "NotoColorEmoji.ttf"
FONT_ENV = "UNCLIP_EMOJI_FONT"
CACHE_ENV = "UNCLIP_EMOJI_CACHE"
FONT_SIZE = 109  # the font's only bitmap strike
MAX_EMOJI_VERSION = 15.0
VAL_PER_MILLE = 100  # val holds out the names whose hash falls below this, out of 1000
MARGIN = 0.04  # white border on each side, as a fraction of the glyph's longer side
RENDER_VERSION = 1  # bump when the rendering changes: it is part of the cache key
SPLITS = ("train", "val", "all")
FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
    "~/AppData/Local/Microsoft/Windows/Fonts",
)
INSTALL_HINT = (
    "install it with `sudo apt-get install fonts-noto-color-emoji` (Debian/Ubuntu; scripts/setup.sh tries "
    f"this), or download {FONT_FILE} from https://github.com/googlefonts/noto-emoji/releases and pass "
    f"font_path=... (or set ${FONT_ENV})"
)

_TONE = r"(?:light|medium-light|medium|medium-dark|dark)_skin_tone"
_FEATURE = r"(?:red_hair|curly_hair|white_hair|blond_hair|bald|beard)"
_MEMBER = r"(?:man|woman|person|boy|girl|child|adult)"
_TONED = re.compile(rf"(?P<base>.+?)(?P<tones>(?:_{_TONE})+)(?:_(?P<feature>{_FEATURE}))?")
_FEATURED = re.compile(rf"(?P<base>man|woman|person)_(?P<feature>{_FEATURE})")
_GROUP = re.compile(rf"(?P<kind>kiss|couple_with_heart|family)_(?P<members>{_MEMBER}(?:_{_MEMBER})*)")


@dataclass(frozen=True)
class EmojiEntry:
    """One kept emoji: the string, its captions (main name first) and its split."""

    emoji: str
    name: str  # readable main name, e.g. "woman surfing: light skin tone"
    names: tuple[str, ...]  # every caption: the main name, then the distinct aliases
    key: str  # the emoji package's name, e.g. ":woman_surfing_light_skin_tone:"
    version: float  # Emoji version that introduced it
    split: str  # "train" or "val"


# ----------------------------------------------------------------------------------------------------
# names


def readable_name(key: str) -> str:
    """The emoji package's ``:snake_case:`` name as text, with CLDR's ``base: qualifier, ...`` form.

    ``:red_apple:`` -> "red apple"; ``:woman_surfing_light_skin_tone:`` -> "woman surfing: light skin
    tone"; ``:man_red_hair:`` -> "man: red hair"; ``:kiss_woman_man:`` -> "kiss: woman, man";
    ``:keycap_#:`` -> "keycap: #". Flags get "flag: " in ``_candidates``.
    """
    body = key.strip(":").replace("\u2019", "'")
    qualifiers: list[str] = []
    if match := _TONED.fullmatch(body):
        body = match["base"]
        qualifiers = re.findall(_TONE, match["tones"]) + ([match["feature"]] if match["feature"] else [])
    elif match := _FEATURED.fullmatch(body):
        body, qualifiers = match["base"], [match["feature"]]
    elif body.startswith("keycap_"):
        body, qualifiers = "keycap", [body[len("keycap_"):]]
    if match := _GROUP.fullmatch(body):  # CLDR lists the members with the qualifiers: "kiss: man, man, dark ..."
        body, qualifiers = match["kind"], match["members"].split("_") + qualifiers
    text = body if not qualifiers else f"{body}: {', '.join(qualifiers)}"
    return text.replace("_", " ")


def _dedup_key(text: str) -> str:
    return "".join(c for c in text.casefold() if c.isalnum())


def _is_flag(emoji: str) -> bool:
    regional = len(emoji) == 2 and all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in emoji)
    return regional or (emoji.startswith("\U0001F3F4") and emoji.endswith("\U000E007F"))  # England, ...


def split_of(key: str) -> str:
    """The split of an emoji by its package name (``:red_apple:``): "val" for a fixed ~10% of names,
    chosen by SHA-256 so it is the same on every machine, else "train"."""
    digest = hashlib.sha256(f"unclip/emoji/{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") % 1000 < VAL_PER_MILLE else "train"


def _candidates() -> list[EmojiEntry]:
    """Fully-qualified emoji of version <= MAX_EMOJI_VERSION with their captions, sorted by main name."""
    import emoji as emoji_package

    fully_qualified = emoji_package.STATUS["fully_qualified"]
    entries = []
    for emoji, data in emoji_package.EMOJI_DATA.items():
        if data["status"] != fully_qualified or data["E"] > MAX_EMOJI_VERSION:
            continue
        key = data["en"]
        name = readable_name(key)
        captions = [name]
        if _is_flag(emoji):
            captions = [f"flag: {name}", name]
        for alias in data.get("alias", ()):
            text = alias.strip(":").replace("_", " ").replace("\u2019", "'")
            if sum(c.isalpha() for c in text) >= 2:  # ":+1:", ":100:", ":a:" say little as captions
                captions.append(text)
        names, seen = [], set()
        for caption in captions:
            if _dedup_key(caption) not in seen:
                seen.add(_dedup_key(caption))
                names.append(caption)
        entries.append(EmojiEntry(emoji, names[0], tuple(names), key, float(data["E"]), split_of(key)))
    # an alias that names another emoji too (":kiss:" is the kiss mark's alias and the couple's name) goes
    owners: dict[str, set[str]] = {}
    for entry in entries:
        for caption in entry.names:
            owners.setdefault(_dedup_key(caption), set()).add(entry.emoji)
    entries = [
        replace(e, names=(e.name,) + tuple(c for c in e.names[1:] if owners[_dedup_key(c)] == {e.emoji}))
        for e in entries
    ]
    entries.sort(key=lambda e: (e.name.casefold(), e.emoji))
    return entries


# ----------------------------------------------------------------------------------------------------
# the font


def _fc_match() -> str | None:
    """The Noto Color Emoji file fontconfig knows, if any (fc-match falls back silently, so check)."""
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}", "Noto Color Emoji"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    return path if Path(path).name.startswith("NotoColorEmoji") and Path(path).is_file() else None


def find_font(font_path: str | os.PathLike | None = None) -> Path:
    """The Noto Color Emoji font file: ``font_path``, ``$UNCLIP_EMOJI_FONT``, fontconfig or the usual
    font folders, in that order. Raises FileNotFoundError saying how to install it."""
    given = font_path if font_path not in (None, "") else os.environ.get(FONT_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            where = "font_path" if font_path not in (None, "") else f"${FONT_ENV}"
            raise FileNotFoundError(f"{where}={str(given)!r} is not a font file; {INSTALL_HINT}")
        return path
    if found := _fc_match():
        return Path(found)
    for folder in FONT_DIRS:
        root = Path(folder).expanduser()
        if root.is_dir():
            for path in sorted(root.rglob("NotoColorEmoji*.ttf")):
                return path
    raise FileNotFoundError(
        f"the Noto Color Emoji font ({FONT_FILE}) was not found (looked at ${FONT_ENV}, fontconfig and "
        f"{', '.join(FONT_DIRS)}); {INSTALL_HINT}"
    )


@lru_cache(maxsize=4)
def _font(path: str) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, FONT_SIZE)
    except OSError as err:
        raise ValueError(f"cannot open {path!r} as the Noto Color Emoji font at size {FONT_SIZE}: {err}; "
                         f"{INSTALL_HINT}") from err


def _draw(font: ImageFont.FreeTypeFont, emoji: str) -> Image.Image:
    """The emoji as drawn by the font: an RGBA image the size of its layout box."""
    left, top, right, bottom = font.getbbox(emoji)
    canvas = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((-left, -top), emoji, font=font, embedded_color=True)
    return canvas


@lru_cache(maxsize=4)
def _reference(path: str) -> tuple[tuple[int, int, int, int], bytes]:
    """Layout box and pixels of a code point no font has (a noncharacter): what ``.notdef`` looks like."""
    font = _font(path)
    notdef = "\U0010FFFF"
    return font.getbbox(notdef), _draw(font, notdef).tobytes()


def draws_one_glyph(emoji: str, font_path: str | os.PathLike | None = None) -> bool:
    """Whether the font draws ``emoji`` as one colour glyph: not several (an unsupported sequence falls
    apart and lays out wider than one glyph), not ``.notdef``, not blank."""
    path = str(find_font(font_path))
    font = _font(path)
    bbox = font.getbbox(emoji)
    width, height = bbox[2] - bbox[0], bbox[3] - bbox[1]
    if height <= 0 or width <= 0 or width > 1.5 * font.getlength("\U0001F600"):  # one glyph's advance
        return False
    notdef_bbox, notdef_pixels = _reference(path)
    return not (bbox == notdef_bbox and _draw(font, emoji).tobytes() == notdef_pixels)


def render_emoji(emoji: str, image_size: int = 64, font_path: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [S, S, 3]: the emoji on white, cropped to its glyph plus a margin, centred, aspect kept."""
    check_image_size(image_size)
    glyph = _draw(_font(str(find_font(font_path))), emoji)
    box = glyph.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"the font draws nothing for emoji {emoji!r}")
    glyph = glyph.crop(box)
    on_white = Image.alpha_composite(Image.new("RGBA", glyph.size, (255, 255, 255, 255)), glyph).convert("RGB")
    side = round(max(glyph.size) * (1 + 2 * MARGIN))
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(on_white, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return np.asarray(square.resize((image_size, image_size), Image.LANCZOS), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# the kept list and the cached images


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: ``cache_dir`` if given (it must exist: a config, which may come from anywhere, never
    creates folders), else ``$UNCLIP_EMOJI_CACHE`` or ``~/.cache/unclip/emoji`` (created when first written)."""
    if cache_dir not in (None, ""):
        folder = Path(cache_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"emoji cache_dir {str(folder)!r} is not an existing folder; create it, or leave cache_dir unset to "
                f"cache in ${CACHE_ENV} or ~/.cache/unclip/emoji")
        return folder
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "unclip" / "emoji"


def _cache_key(font: Path) -> str:
    """What the kept list and the images depend on: the font file, the names package, the rules."""
    from importlib.metadata import version

    stat = font.stat()
    parts = [font.resolve(), stat.st_size, stat.st_mtime_ns, version("emoji"), MAX_EMOJI_VERSION,
             VAL_PER_MILLE, MARGIN, RENDER_VERSION]
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write) -> None:
    """Write via a temporary file in the same folder; a failure (read-only home...) only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
            write(tmp)
        os.chmod(tmp.name, 0o644)  # a temporary file is private; a cache file is not
        os.replace(tmp.name, path)
    except OSError as err:
        log.warning("could not write the emoji cache %s: %s", path, err)


@lru_cache(maxsize=8)
def _kept(font: str, cache_dir: str) -> tuple[EmojiEntry, ...]:
    path = Path(cache_dir) / f"emoji-{_cache_key(Path(font))}.json"
    candidates = _candidates()
    if path.is_file():
        try:
            kept = set(json.loads(path.read_text(encoding="utf-8")))
            return tuple(e for e in candidates if e.emoji in kept)
        except (OSError, ValueError) as err:
            log.warning("ignoring the unreadable emoji cache %s: %s", path, err)
    entries = tuple(e for e in candidates if draws_one_glyph(e.emoji, font))
    _write_atomic(path, lambda f: f.write(json.dumps([e.emoji for e in entries], ensure_ascii=False).encode()))
    return entries


def list_emoji(split: str = "all", font_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> list[EmojiEntry]:
    """The kept emoji of ``split`` ("train", "val" or "all"), sorted by main name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entries = _kept(str(find_font(font_path)), str(_cache_dir(cache_dir)))
    return [e for e in entries if split == "all" or e.split == split]


def emoji_names(split: str = "val", font_path: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Main names of the kept emoji of ``split``, e.g. the held-out prompts of ``val``."""
    return [e.name for e in list_emoji(split, font_path, cache_dir)]


_IMAGES: dict[tuple[str, str, int], np.ndarray] = {}


def render_all(image_size: int = 64, font_path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [N, S, S, 3]: every kept emoji (``list_emoji("all")`` order), rendered once per machine.

    Loaded from the disk cache (memory-mapped, so data-loader workers share the pages) or rendered and
    saved there; one process renders while others wait on a lock file.
    """
    from filelock import FileLock

    check_image_size(image_size)
    font, folder = find_font(font_path), _cache_dir(cache_dir)
    memo = (str(font), str(folder), image_size)
    if memo in _IMAGES:
        return _IMAGES[memo]
    entries = list_emoji("all", font, folder)
    path = folder / f"emoji-{_cache_key(font)}-{image_size}px.npy"
    expected = (len(entries), image_size, image_size, 3)
    images = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
    except OSError:
        lock = None
    with lock if lock is not None else contextlib.nullcontext():
        if path.is_file():
            try:
                images = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                log.warning("ignoring the unreadable emoji cache %s: %s", path, err)
            if images is not None and images.shape != expected:
                log.warning("ignoring the emoji cache %s: shape %s, expected %s", path, images.shape, expected)
                images = None
        if images is None:
            start = time.perf_counter()
            images = np.stack([render_emoji(e.emoji, image_size, font) for e in entries])
            log.info("rendered %d emoji at %d px in %.1f s", len(entries), image_size, time.perf_counter() - start)
            _write_atomic(path, lambda f: np.save(f, images))
    _IMAGES[memo] = images
    return images


def clear_memory_cache() -> None:
    """Forget the kept lists and images held in memory (the disk cache stays)."""
    _IMAGES.clear()
    _kept.cache_clear()


# ----------------------------------------------------------------------------------------------------
# the data set


@register
class EmojiDataset(torch.utils.data.Dataset):
    """Map-style emoji images with their names as captions.

    ``train`` / ``all``: with ``aliases`` one item per (emoji, caption) pair, main name and aliases, in
    name order; without, one item per emoji with its main name. ``val``: always one item per held-out
    emoji with its main name. ``limit`` keeps that many emoji spread evenly over the split's name order
    (a small fixed sample, e.g. for a sample grid). Items: ``{"image": float32 [3, S, S] in [-1, 1],
    "caption": str, "meta": {"emoji", "name", "names"}}``.

    Constructing reads the kept list (seconds the first time on a machine); images are rendered or
    loaded on the first item.
    """

    def __init__(self, split: str = "train", image_size: int = 64, font_path: str | os.PathLike | None = None,
                 aliases: bool = True, limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                 caption_noise: float = 0.0, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        self.split, self.image_size, self.aliases, self.limit = split, check_image_size(image_size), aliases, limit
        # a share of the training captions replaced by web-like garbage (unclip/data/caption_noise.py)
        self.noise = CaptionNoise(caption_noise, seed, source=f"EmojiDataset(split={split!r})", split=split)
        folder = _cache_dir(cache_dir)
        if cache_dir in (None, ""):  # the default folder is the library's to create (a given one must exist)
            folder.mkdir(parents=True, exist_ok=True)
        self.cache_dir = str(folder)
        self.font_path = str(find_font(font_path))
        everything = list_emoji("all", self.font_path, self.cache_dir)
        rows = [i for i, e in enumerate(everything) if split == "all" or e.split == split]
        if limit is not None and limit < len(rows):
            rows = [rows[int(j)] for j in np.unique(np.linspace(0, len(rows) - 1, limit).round())]
        self.entries = [everything[i] for i in rows]
        self.rows = rows  # row of each entry in render_all()
        with_aliases = aliases and split != "val"
        self.items = [(k, caption) for k, e in enumerate(self.entries)
                      for caption in (e.names if with_aliases else e.names[:1])]
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for an EmojiDataset of length {len(self)}")
        k, caption = self.items[i]
        if self._images is None:
            self._images = render_all(self.image_size, self.font_path, self.cache_dir)
        entry = self.entries[k]
        item = {"image": to_tensor(self._images[self.rows[k]]), "caption": caption,
                "meta": {"emoji": entry.emoji, "name": entry.name, "names": list(entry.names)}}
        if self.noise:
            other = others_of(len(self), i % len(self), lambda j: self.items[j][1] if self.items[j][0] != k else None)
            self.noise.apply(item, i % len(self), other)  # another emoji's caption (not an alias of this one)
        return item

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None  # workers memory-map the disk cache instead of receiving a copy
        return state

    def __repr__(self) -> str:
        return (f"EmojiDataset(split={self.split!r}, image_size={self.image_size}, emoji={len(self.entries)}, "
                f"items={len(self)}, aliases={self.aliases}, limit={self.limit})")
