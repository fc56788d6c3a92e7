"""A folder of images with captions, as a map-style data set of clean items.

Two caption layouts (``captions=``):

* ``"jsonl"``: ``captions.jsonl`` in the root, one ``{"file": "a/b.png", "caption": "..."}`` a line (paths
  relative to the root; several lines may name one image);
* ``"txt"``: ``name.txt`` beside each ``name.<ext>`` image (any extension PIL opens, in any sub-folder);
* ``"auto"`` (default): ``"jsonl"`` when ``captions.jsonl`` exists, else ``"txt"``.

Problems found while indexing (``bad_json_line``, ``missing_caption``, ``missing_image``) leave the
image out and are counted in ``index_issues``. Problems found while reading are counted per item
(see :meth:`ImageFolderDataset.__getitem__`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from unclip.configurable import register
from unclip.data.cleaning import MAX_CAPTION_CHARS, MAX_PIXELS, MIN_SIZE, BadItem, add_issues, clean_caption, load_image

CAPTIONS_FILE = "captions.jsonl"
SPLITS = ("train", "val", "all")
LAYOUTS = ("auto", "jsonl", "txt")
MAX_TRIES = 32  # items read at most (the requested one, then the next ones) before __getitem__ gives up


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def split_of(file: str, val_fraction: float, seed: int = 0) -> str:
    """"val" or "train" for a file name (its path relative to the root): a hash, the same everywhere."""
    digest = hashlib.blake2b(f"{seed}/{file}".encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


@register
class ImageFolderDataset(torch.utils.data.Dataset):
    """Image/caption items {"image", "caption", "meta": {"file"}, "issues"} from a folder (see module)."""

    def __init__(self, root: str | Path, image_size: int = 64, split: str = "train", val_fraction: float = 0.05,
                 captions: str = "auto", seed: int = 0, *, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE,
                 max_caption_chars: int = MAX_CAPTION_CHARS, max_tries: int = MAX_TRIES):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if captions not in LAYOUTS:
            raise ValueError(f"captions must be one of {LAYOUTS}, got {captions!r}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.image_size, self.split, self.val_fraction, self.seed = image_size, split, val_fraction, seed
        self.max_pixels, self.min_size = max_pixels, min_size
        self.max_caption_chars, self.max_tries = max_caption_chars, max_tries
        if captions == "auto":
            captions = "jsonl" if (self.root / CAPTIONS_FILE).is_file() else "txt"
        self.layout = captions
        images, texts = _scan(self.root)
        if not images:
            raise ValueError(f"image folder {str(self.root)!r} holds no image files (extensions PIL opens)")
        issues: Counter[str] = Counter()
        # (file, caption): a caption string (jsonl) or the caption file's path relative to the root (txt)
        if self.layout == "jsonl":
            entries = _index_jsonl(self.root, images, issues)
        else:
            entries = _index_txt(images, texts, issues)
        self.index_issues: dict[str, int] = dict(issues)
        if split != "all":
            entries = [entry for entry in entries if split_of(entry[0], val_fraction, seed) == split]
        if not entries:
            raise ValueError(
                f"image folder {str(self.root)!r} has no captioned image in split {split!r} "
                f"({len(images)} images, val_fraction={val_fraction}, captions={self.layout!r}, "
                f"index issues {self.index_issues}); give every image a caption (name.txt beside it, or a line in "
                f"{CAPTIONS_FILE})" + ("" if split == "all" else ", or change val_fraction to move images into it")
            )
        self._entries = entries
        self.files: list[str] = [file for file, _ in entries]
        self[0]  # a split none of whose first max_tries images can be read is an error now, not when first read

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        """Item ``index``; if its file is bad, the next good one (index+1, index+2, ... wrapping).

        ``issues`` counts the problems of the file at ``index`` only: why it was skipped, or what was
        normalised in it. Files tried after it are counted when their own index is read, so one pass
        over every index counts each file exactly once. Raises RuntimeError, naming the files and
        reasons, when ``max_tries`` files in a row are bad.
        """
        n = len(self._entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for an ImageFolderDataset of length {n}")
        index %= n
        issues: dict[str, int] = {}
        failures: list[str] = []
        for attempt in range(min(self.max_tries, n)):
            position = (index + attempt) % n
            try:
                item = self._read(position)
            except BadItem as bad:
                if attempt == 0:
                    issues[bad.reason] = 1
                failures.append(f"{self._entries[position][0]} ({bad})")
                continue
            if attempt == 0:
                issues = item["issues"]
            item["issues"] = issues
            return item
        raise RuntimeError(self._unreadable(index, failures))

    def _unreadable(self, index: int, failures: list[str]) -> str:
        """The error for ``failures`` (every file tried from ``index``, with its reason): which, and the way out."""
        shown = "; ".join(failures[:10]) + (f"; ... ({len(failures) - 10} more)" if len(failures) > 10 else "")
        if len(failures) == len(self._entries):
            return (f"all {len(failures)} images of split {self.split!r} in image folder {str(self.root)!r} are "
                    f"unusable: {shown}. Replace or remove these files"
                    + ("" if self.split == "all" else ", or change val_fraction to give the split other images"))
        return (f"no usable image among {len(failures)} files in a row (max_tries) from index {index} of split "
                f"{self.split!r} in image folder {str(self.root)!r}: {shown}. Replace or remove these files, or "
                "raise max_tries")

    def _read(self, position: int) -> dict:
        file, caption_source = self._entries[position]
        if self.layout == "txt":
            try:
                raw = (self.root / caption_source).read_bytes()
            except FileNotFoundError:
                raise BadItem("missing_caption", f"{caption_source} vanished") from None
            except OSError as err:
                raise BadItem("unreadable_file", f"{caption_source}: {err}") from None
        else:
            raw = caption_source
        caption, caption_issues = clean_caption(raw, max_chars=self.max_caption_chars)
        image, image_issues = load_image(self.root / file, self.image_size, max_pixels=self.max_pixels,
                                         min_size=self.min_size)
        return {"image": image, "caption": caption, "meta": {"file": file},
                "issues": add_issues(caption_issues, image_issues)}

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, items={len(self)}, "
                f"captions={self.layout!r}, image_size={self.image_size})")


def _scan(root: Path) -> tuple[list[str], set[str]]:
    """Image files (sorted) and .txt files under ``root`` as POSIX relative paths; hidden ones skipped."""
    extensions = image_extensions()
    images, texts = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            extension = os.path.splitext(name)[1].lower()
            if name.startswith(".") or (extension != ".txt" and extension not in extensions):
                continue
            file = Path(folder, name).relative_to(root).as_posix()
            if extension == ".txt":
                texts.add(file)
            else:
                images.append(file)
    return sorted(images), texts


def _index_txt(images: list[str], texts: set[str], issues: Counter) -> list[tuple[str, str]]:
    entries = []
    for file in images:
        caption_file = os.path.splitext(file)[0] + ".txt"
        if caption_file in texts:
            entries.append((file, caption_file))
        else:
            issues["missing_caption"] += 1
    return entries


def _index_jsonl(root: Path, images: list[str], issues: Counter) -> list[tuple[str, str]]:
    present = set(images)
    named: set[str] = set()
    entries = []
    with open(root / CAPTIONS_FILE, "rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # also bad UTF-8
                issues["bad_json_line"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("file"), str):
                issues["bad_json_line"] += 1
                continue
            file, caption = Path(record["file"]).as_posix(), record.get("caption")
            if file not in present:
                issues["missing_image"] += 1
                continue
            named.add(file)
            if caption is None:
                issues["missing_caption"] += 1
            elif not isinstance(caption, str):
                issues["bad_json_line"] += 1
            else:
                entries.append((file, caption))
    unnamed = sum(1 for file in images if file not in named)
    if unnamed:
        issues["missing_caption"] += unnamed
    return entries
