"""A folder of images with captions, as a map-style data set of clean items.

Two caption layouts (``captions=``):

* ``"jsonl"``: ``captions.jsonl`` in the root, one ``{"file": "a/b.png", "caption": "..."}`` a line (paths
  relative to the root; several lines may name one image);
* ``"txt"``: ``name.txt`` beside each ``name.<ext>`` image (any extension PIL opens, in any sub-folder);
* ``"auto"`` (default): ``"jsonl"`` when ``captions.jsonl`` exists, else ``"txt"``.

Indexing walks the folder once: symbolic links to folders are followed, each real folder at most once
(a link loop or a second link to a folder adds nothing: ``repeated_folder``); files that are not regular
(FIFOs, sockets, devices) are left out without being opened (``not_a_file``; a broken link: ``unreadable_file``);
images whose bytes repeat an earlier one (copies, hard links) take its split, so one picture cannot sit in both
splits (each copy stays an item, under its own name and caption: the folder holds it twice). File names that are not
UTF-8 are read; messages and ``meta["file"]`` name them with ``\\xNN`` for the bytes that are not.
Problems found while indexing (also ``bad_json_line``, ``missing_caption``, ``missing_image``,
``unreadable_folder``) leave the file out and are counted in ``index_issues``. Problems found while reading
are counted per item (see :meth:`ImageFolderDataset.__getitem__`); a bad file is skipped however many follow
it, and only a split with no usable image is an error (raised when the data set is built).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image

from unclip.configurable import register
from unclip.data.caption_noise import CaptionNoise, others_of
from unclip.data.cleaning import (
    MAX_CAPTION_CHARS,
    MAX_PIXELS,
    MIN_SIZE,
    BadItem,
    add_issues,
    clean_caption,
    load_image,
    open_regular,
    readable_name,
)

CAPTIONS_FILE = "captions.jsonl"
SPLITS = ("train", "val", "all")
LAYOUTS = ("auto", "jsonl", "txt")
SHOWN = 10  # files named at most in an error


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def split_of(file: str, val_fraction: float, seed: int = 0) -> str:
    """"val" or "train" for a file name (its path relative to the root): a hash, the same everywhere."""
    digest = hashlib.blake2b(f"{seed}/{file}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < val_fraction else "train"


@register
class ImageFolderDataset(torch.utils.data.Dataset):
    """Image/caption items {"image", "caption", "meta": {"file"}, "issues"} from a folder (see module)."""

    def __init__(self, root: str | Path, image_size: int = 64, split: str = "train", val_fraction: float = 0.05,
                 captions: str = "auto", seed: int = 0, *, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE,
                 max_caption_chars: int = MAX_CAPTION_CHARS, caption_noise: float = 0.0):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if captions not in LAYOUTS:
            raise ValueError(f"captions must be one of {LAYOUTS}, got {captions!r}")
        # a share of the training captions replaced by web-like garbage, by file name (unclip/data/caption_noise.py)
        self.noise = CaptionNoise(caption_noise, seed, source=f"ImageFolderDataset(split={split!r})", split=split)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        self.image_size, self.split, self.val_fraction, self.seed = image_size, split, val_fraction, seed
        self.max_pixels, self.min_size, self.max_caption_chars = max_pixels, min_size, max_caption_chars
        if captions == "auto":
            captions = "jsonl" if (self.root / CAPTIONS_FILE).is_file() else "txt"
        self.layout = captions
        issues: Counter[str] = Counter()
        images, texts = _scan(self.root, issues)
        if not images:
            raise ValueError(f"image folder {str(self.root)!r} holds no image files (extensions PIL opens)"
                             + (f"; left out: {dict(issues)}" if issues else ""))
        # (file, caption): a caption string (jsonl) or the caption file's path relative to the root (txt)
        if self.layout == "jsonl":
            entries = _index_jsonl(self.root, images, issues)
        else:
            entries = _index_txt(images, texts, issues)
        first = _duplicates(self.root, images)
        self.index_issues: dict[str, int] = dict(issues)
        if split != "all":  # a copy goes where the first file with its bytes goes
            entries = [entry for entry in entries if split_of(first.get(entry[0], entry[0]), val_fraction, seed) == split]
        if not entries:
            raise ValueError(
                f"image folder {str(self.root)!r} has no captioned image in split {split!r} "
                f"({len(images)} images, val_fraction={val_fraction}, captions={self.layout!r}, "
                f"index issues {self.index_issues}); give every image a caption (name.txt beside it, or a line in "
                f"{CAPTIONS_FILE})" + ("" if split == "all" else ", or change val_fraction to move images into it")
            )
        self._entries = entries
        self.files: list[str] = [readable_name(file) for file, _ in entries]
        self._bad: dict[int, BadItem] = {}  # positions found unusable (per process): read once, then skipped
        self._good_after: dict[int, int] = {}  # bad position -> the good one found after it (a run jumped at once)
        self[0]  # a split with no usable image is an error now, not when first read

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict:
        """Item ``index``; if its file is bad, the next good one (index+1, index+2, ... wrapping).

        ``issues`` counts the problems of the file at ``index`` only: why it was skipped, or what was
        normalised in it. Files tried after it are counted when their own index is read, so one pass
        over every index counts each file exactly once. A run of bad files of any length is skipped (each
        is read once per process); RuntimeError, naming the files and reasons, when none is usable.
        """
        n = len(self._entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for an ImageFolderDataset of length {n}")
        index %= n
        issues: dict[str, int] = {}
        position, travelled, skipped = index, 0, []
        while travelled < n:
            bad = self._bad.get(position)
            if bad is None:
                try:
                    item = self._read(position)
                except BadItem as err:
                    bad = self._bad[position] = err
                else:
                    self._good_after.update(dict.fromkeys(skipped, position))
                    item["issues"] = item["issues"] if position == index else issues
                    return item
            if position == index:
                issues = {bad.reason: 1}
            skipped.append(position)
            step = (self._good_after.get(position, position + 1) - position) % n or n  # past a known bad run
            position, travelled = (position + step) % n, travelled + step
        raise RuntimeError(self._unusable())

    def _unusable(self) -> str:
        """The error for a split none of whose files is usable: which, why, and the way out."""
        failures = [f"{self.files[position]} ({bad})" for position, bad in sorted(self._bad.items())]
        shown = "; ".join(failures[:SHOWN]) + (f"; ... ({len(failures) - SHOWN} more)" if len(failures) > SHOWN else "")
        return (f"all {len(failures)} images of split {self.split!r} in image folder {str(self.root)!r} are "
                f"unusable: {shown}. Replace or remove these files"
                + ("" if self.split == "all" else ", or change val_fraction to give the split other images"))

    def _read(self, position: int) -> dict:
        file, _ = self._entries[position]
        caption, caption_issues = self._caption(position)
        image, image_issues = load_image(self.root / file, self.image_size, max_pixels=self.max_pixels,
                                         min_size=self.min_size)
        item = {"image": image, "caption": caption, "meta": {"file": readable_name(file)},
                "issues": add_issues(caption_issues, image_issues)}
        if self.noise:
            self.noise.apply(item, readable_name(file), others_of(len(self._entries), position, self._other_caption))
        return item

    def _caption(self, position: int) -> tuple[str, dict[str, int]]:
        """The clean caption of entry ``position`` and its issues; BadItem."""
        caption_source = self._entries[position][1]
        if self.layout == "txt":
            raw = _read_caption(self.root / caption_source, 16 * 4 * self.max_caption_chars)
        else:
            raw = caption_source
        return clean_caption(raw, max_chars=self.max_caption_chars)

    def _other_caption(self, position: int) -> str | None:
        try:
            return self._caption(position)[0]
        except BadItem:  # a missing or empty caption: the garbage is of another kind
            return None

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, items={len(self)}, "
                f"captions={self.layout!r}, image_size={self.image_size})")


def _read_caption(path: Path, limit: int) -> bytes:
    """A caption file's first ``limit`` bytes (a caption is cut far shorter anyway), or BadItem."""
    try:
        with open_regular(path) as stream:
            return stream.read(limit)
    except BadItem as bad:
        reason = "missing_caption" if not os.path.lexists(path) else bad.reason
        raise BadItem(reason, bad.detail) from None
    except OSError as err:
        raise BadItem("unreadable_file", f"{readable_name(path)}: {err}") from None


def _scan(root: Path, issues: Counter) -> tuple[dict[str, os.stat_result], set[str]]:
    """Image files (with their stat) and .txt files under ``root`` as POSIX relative paths, hidden ones skipped:
    each real folder walked once (links to folders followed), only regular files kept (none opened)."""
    extensions = image_extensions()
    images: dict[str, os.stat_result] = {}
    texts: set[str] = set()
    seen: set[tuple[int, int]] = set()
    pending = [""]  # folders to walk, relative to the root
    while pending:
        folder = pending.pop()
        entries = _list_folder(root / folder, seen, issues)
        subfolders = []
        for name, info in entries:
            file = f"{folder}/{name}" if folder else name
            if info is not None and stat.S_ISDIR(info.st_mode):
                subfolders.append(file)
                continue
            extension = os.path.splitext(name)[1].lower()
            if extension != ".txt" and extension not in extensions:
                continue
            if info is None:
                issues["unreadable_file"] += 1  # a broken link, or no permission to look
            elif not stat.S_ISREG(info.st_mode):
                issues["not_a_file"] += 1
            elif extension == ".txt":
                texts.add(file)
            else:
                images[file] = info
        pending.extend(reversed(subfolders))
    return dict(sorted(images.items())), texts


def _list_folder(folder: Path, seen: set[tuple[int, int]], issues: Counter) -> list[tuple[str, os.stat_result | None]]:
    """(name, stat following links, None if it fails) of the visible entries of ``folder``, sorted; none if the
    folder was walked already (by another path: a link loop) or cannot be listed."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            issues["repeated_folder"] += 1
            return []
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as scan:
            names = sorted(entry.name for entry in scan if not entry.name.startswith("."))
    except OSError:
        issues["unreadable_folder"] += 1
        return []
    listed = []
    for name in names:
        try:
            listed.append((name, os.stat(folder / name)))
        except OSError:
            listed.append((name, None))
    return listed


def _duplicates(root: Path, images: dict[str, os.stat_result]) -> dict[str, str]:
    """file -> the first file (in name order) with the same bytes, for every file repeating an earlier one.

    Only files of the same size are compared (hard links by inode, others by a hash of their bytes), so a
    folder without repeats costs no reading. A file that cannot be read is left to fail when read as an item.
    """
    by_size: dict[int, list[str]] = defaultdict(list)
    for file, info in images.items():
        by_size[info.st_size].append(file)
    first: dict[str, str] = {}
    by_inode: dict[tuple[int, int], bytes | None] = {}
    for files in by_size.values():
        if len(files) < 2:
            continue
        first_of: dict[bytes, str] = {}
        for file in files:
            inode = (images[file].st_dev, images[file].st_ino)
            if inode not in by_inode:
                by_inode[inode] = _digest(root / file)
            if by_inode[inode] is not None:
                first_of.setdefault(by_inode[inode], file)
                if first_of[by_inode[inode]] != file:
                    first[file] = first_of[by_inode[inode]]
    return first


def _digest(path: Path) -> bytes | None:
    try:
        with open_regular(path) as stream:
            return hashlib.file_digest(stream, "blake2b").digest()
    except (BadItem, OSError):
        return None


def _index_txt(images: dict[str, os.stat_result], texts: set[str], issues: Counter) -> list[tuple[str, str]]:
    entries = []
    for file in images:
        caption_file = os.path.splitext(file)[0] + ".txt"
        if caption_file in texts:
            entries.append((file, caption_file))
        else:
            issues["missing_caption"] += 1
    return entries


def _index_jsonl(root: Path, images: dict[str, os.stat_result], issues: Counter) -> list[tuple[str, str]]:
    named: set[str] = set()
    entries = []
    try:
        lines = open_regular(root / CAPTIONS_FILE)
    except BadItem as bad:
        raise ValueError(f"cannot read the captions of image folder {str(root)!r}: {bad}") from None
    with lines:
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
            if file not in images:
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
