"""Image-caption folders and webdataset shards: clean items from dirty files, counted problems, sharding."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from unclip.config import build
from unclip.data.cleaning import MAX_CAPTION_CHARS, BadItem, clean_caption, load_image
from unclip.data.collate import collate_dicts
from unclip.data.folder import ImageFolderDataset
from unclip.data.webdataset_shards import WebDatasetSource

SIZE = 16
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def rgb(item: dict, y: int = SIZE // 2, x: int = SIZE // 2) -> tuple[int, ...]:
    """An item's pixel as uint8 RGB."""
    return tuple(int(v) for v in ((item["image"][:, y, x] + 1) * 127.5).round())


def total_issues(items) -> Counter:
    total = Counter()
    for item in items:
        total.update(item["issues"])
    return total


def check_item(item: dict) -> None:
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str) and item["caption"] and isinstance(item["issues"], dict)


# ----------------------------------------------------------------------------------------------------
# the dirty set: every kind of problem, planted once (or twice) among good samples


def _red_on_transparency() -> Image.Image:
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black: must not darken the result
    image.paste((255, 0, 0, 255), (8, 8, 24, 24))
    return image


@pytest.fixture(scope="module")
def dirty_samples():
    """(name, extension, image bytes, caption bytes or None, check of the good item or None if skipped)."""
    jpeg = encode(Image.new("RGB", (64, 48), BLUE), "JPEG", quality=95)
    png = encode(Image.new("RGB", (64, 48), GREEN))
    big_jpeg = encode(Image.new("L", (10000, 10000), 128), "JPEG", quality=50)  # decoded at 1/8 scale
    big_png = encode(Image.new("1", (10000, 10000), 1))  # 32 kB, 10^8 pixels: refused undecoded
    def near(colour, tolerance=0):
        return lambda item: all(abs(a - b) <= tolerance for a, b in zip(rgb(item), colour))

    def red_on_white(item):
        white = (255, 255, 255)
        return rgb(item) == RED and rgb(item, 0, 0) == white and rgb(item, SIZE - 1, SIZE - 1) == white

    return [
        ("a_clean", "png", png, b"a green rectangle", near(GREEN)),
        ("b_truncated", "jpg", jpeg[: len(jpeg) // 2], b"cut off", None),
        ("c_corrupt", "png", png[:40] + bytes(range(256)) * 4, b"garbage after the header", None),
        ("d_not_image", "jpg", b"this is a text file, not an image", b"a liar", None),
        ("e_mode_l", "png", encode(Image.new("L", (40, 40), 100)), b"grey", near((100, 100, 100))),
        ("f_mode_la", "png", encode(Image.new("LA", (40, 40), (0, 0))), b"invisible", near((255, 255, 255))),
        ("g_mode_p", "png", encode(Image.new("RGB", (40, 40), BLUE).convert("P")), b"palette", near(BLUE)),
        ("h_mode_rgba", "png", encode(_red_on_transparency()), b"red on transparency", red_on_white),
        ("i_mode_cmyk", "jpg", encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95),
         b"cmyk red", near(RED, 3)),
        ("j_mode_i16", "png", encode(Image.fromarray(np.full((40, 40), 32768, np.uint16))), b"16-bit grey",
         near((128, 128, 128))),
        ("k_tiny", "png", encode(Image.new("RGB", (1, 1), RED)), b"one pixel", None),
        ("l_huge", "png", big_png, b"a decompression bomb", None),
        ("m_huge", "jpg", big_jpeg, b"a huge grey jpeg", near((128, 128, 128), 2)),
        ("n_empty_caption", "png", png, b"", None),
        ("o_blank_caption", "png", png, b"  \n\t  ", None),
        ("p_long_caption", "jpg", jpeg, ("word " * 1000).encode(), near(BLUE, 3)),
        ("q_latin1_caption", "png", png, "caf\u00e9 cr\u00e8me".encode("cp1252"), near(GREEN)),
        ("r_mojibake", "png", png, "caf\u00e9 au lait".encode("utf-8").decode("latin-1").encode("utf-8"), near(GREEN)),
        ("s_no_caption", "png", png, None, None),
        ("t_clean", "jpg", jpeg, "un caf\u00e9 \u201cbleu\u201d".encode("utf-8"), near(BLUE, 3)),
    ]


# Problems planted above, with what each source reports for them.
SKIPPED = {"truncated_image": 1, "corrupt_image": 2, "image_too_small": 1, "image_too_large": 1, "empty_caption": 2}
NORMALISED = {"mode_converted": 7, "caption_truncated": 1, "non_utf8_caption": 1, "mojibake_fixed": 1}
CAPTIONS = {"a_clean": "a green rectangle", "q_latin1_caption": "café crème", "r_mojibake": "café au lait",
            "t_clean": "un café “bleu”"}


def _good(samples) -> dict:
    return {name: check for name, _, _, caption, check in samples if check is not None}


def write_folder(root, samples) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, ext, image, caption, _ in samples:
        (root / f"{name}.{ext}").write_bytes(image)
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)


def write_shards(directory, samples, n_shards: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"shard-{i:02d}.tar" for i in range(n_shards)]
    tars = [tarfile.open(path, "w") for path in paths]
    for i, (name, ext, image, caption, _) in enumerate(samples):
        members = [(f"{name}.{ext}", image)] + ([(f"{name}.txt", caption)] if caption is not None else [])
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tars[i % n_shards].addfile(info, io.BytesIO(data))
    for tar in tars:
        tar.close()
    return [str(path) for path in paths]


# ----------------------------------------------------------------------------------------------------
# cleaning


def test_load_image_crops_the_centre_applies_exif_and_scales_16_bit(tmp_path):
    stripes = Image.new("RGB", (60, 20), RED)
    stripes.paste(GREEN, (20, 0, 40, 20))
    stripes.paste(BLUE, (40, 0, 60, 20))
    image, issues = load_image(encode(stripes), SIZE)
    assert issues == {} and rgb({"image": image}, SIZE // 2, 1) == GREEN and rgb({"image": image}, 8, 14) == GREEN

    # stored as 40x20, top red / bottom blue; EXIF orientation 6 (rotate 90 clockwise to display)
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (0, 10, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif.tobytes())
    image, issues = load_image(path, SIZE)
    assert issues == {"exif_rotated": 1}
    assert max(abs(a - b) for a, b in zip(rgb({"image": image}, SIZE // 2, 1), BLUE)) <= 8  # blue now on the left
    assert max(abs(a - b) for a, b in zip(rgb({"image": image}, SIZE // 2, SIZE - 2), RED)) <= 8

    for values, expected in ((np.full((20, 20), 65535, np.int32), 255), (np.full((20, 20), 0.25, np.float32), 64)):
        image, issues = load_image(encode(Image.fromarray(values), "TIFF"), SIZE)
        assert issues == {"mode_converted": 1} and rgb({"image": image}) == (expected,) * 3


def test_load_image_refuses_bad_files_with_a_reason(tmp_path):
    with pytest.raises(BadItem) as missing:
        load_image(tmp_path / "nope.png", SIZE)
    assert missing.value.reason == "unreadable_file" and "nope.png" in str(missing.value)
    with pytest.raises(BadItem) as small:
        load_image(encode(Image.new("RGB", (15, 300))), SIZE, min_size=16)
    assert small.value.reason == "image_too_small"
    with pytest.raises(BadItem) as large:
        load_image(encode(Image.new("RGB", (300, 300))), SIZE, max_pixels=300 * 299)
    assert large.value.reason == "image_too_large"


def test_clean_caption():
    assert clean_caption("  a\tred \n\n circle\x00\x07 ") == ("a red circle", {"control_chars_stripped": 1})
    assert clean_caption("“quoted” &amp; ﬁne 👍🏽".encode()) == ("“quoted” & ﬁne 👍🏽", {})
    text, issues = clean_caption("word " * 10, max_chars=12)
    assert text == "word word" and issues == {"caption_truncated": 1}
    text, issues = clean_caption("x" * 30, max_chars=12)
    assert text == "x" * 12 and issues == {"caption_truncated": 1}
    for raw, reason in ((None, "missing_caption"), ("", "empty_caption"), (b" \r\n\t\x00", "empty_caption")):
        with pytest.raises(BadItem) as bad:
            clean_caption(raw)
        assert bad.value.reason == reason


# ----------------------------------------------------------------------------------------------------
# folders


def test_clean_folder_with_txt_captions_and_a_stable_split(tmp_path):
    colours = [RED, GREEN, BLUE, (255, 255, 0), (0, 255, 255)] * 4
    for i, colour in enumerate(colours):
        Image.new("RGB", (24 + i, 20), colour).save(tmp_path / f"{i:02d}.{'png' if i % 2 else 'jpg'}", quality=95)
        (tmp_path / f"{i:02d}.txt").write_text(f"item number {i}\n")
    everything = ImageFolderDataset(tmp_path, image_size=SIZE, split="all")
    assert len(everything) == 20 and everything.index_issues == {}
    for i in range(20):
        item = everything[i]
        check_item(item)
        assert item["caption"] == f"item number {i}" and item["meta"]["file"].startswith(f"{i:02d}.")
        assert max(abs(a - b) for a, b in zip(rgb(item), colours[i])) <= 3

    train = ImageFolderDataset(tmp_path, image_size=SIZE, split="train", val_fraction=0.3)
    val = ImageFolderDataset(tmp_path, image_size=SIZE, split="val", val_fraction=0.3)
    assert set(train.files).isdisjoint(val.files) and sorted(train.files + val.files) == everything.files
    # a hash of the name, not Python's salted hash(): the same split on every machine and in every run
    assert val.files == [
        "00.jpg", "01.png", "04.jpg", "08.jpg", "09.png", "11.png", "12.jpg", "13.png", "14.jpg", "17.png", "18.jpg"]
    other_seed = ImageFolderDataset(tmp_path, image_size=SIZE, split="val", val_fraction=0.3, seed=1)
    assert other_seed.files != val.files


def test_folder_with_captions_jsonl(tmp_path):
    for i, colour in enumerate((RED, GREEN, BLUE)):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{i}.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "uncaptioned.png")
    lines = [
        json.dumps({"file": "0.png", "caption": "red"}),
        "{not json",
        json.dumps({"file": "1.png", "caption": "green"}),
        json.dumps({"file": "1.png", "caption": "another caption of the green one"}),
        json.dumps({"file": "2.png", "caption": "blue"}),
        json.dumps({"file": "gone.png", "caption": "missing"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "2.txt").write_text("ignored: the jsonl is used")
    data = ImageFolderDataset(tmp_path, image_size=SIZE, split="all")
    assert data.layout == "jsonl"
    assert data.index_issues == {"bad_json_line": 1, "missing_image": 1, "missing_caption": 1}
    items = [data[i] for i in range(len(data))]
    assert [item["caption"] for item in items] == ["red", "green", "another caption of the green one", "blue"]
    assert [rgb(item) for item in items] == [RED, GREEN, GREEN, BLUE]


def test_dirty_folder_never_raises_and_counts_every_problem(tmp_path, dirty_samples):
    write_folder(tmp_path, dirty_samples)
    data = ImageFolderDataset(tmp_path, image_size=SIZE, split="all")
    assert data.index_issues == {"missing_caption": 1}  # s_no_caption is left out when indexing
    assert len(data) == len(dirty_samples) - 1
    items = [data[i] for i in range(len(data))]
    for item in items:
        check_item(item)
    assert total_issues(items) == Counter(SKIPPED) + Counter(NORMALISED)

    good = _good(dirty_samples)
    by_file = {}
    for i, item in enumerate(items):
        name = item["meta"]["file"].split(".")[0]
        assert name in good  # a skipped file is replaced by a good one
        if data.files[i] == item["meta"]["file"]:
            by_file[name] = item
    assert set(by_file) == set(good)
    for name, check in good.items():
        assert check(by_file[name]), (name, rgb(by_file[name]))
    for name, caption in CAPTIONS.items():
        assert by_file[name]["caption"] == caption
    assert len(by_file["p_long_caption"]["caption"]) <= MAX_CAPTION_CHARS
    assert by_file["p_long_caption"]["caption"].endswith("word")


def test_folder_errors_name_the_path_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        ImageFolderDataset(tmp_path / "no_such_folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x", "y"):
        (bad / f"{name}.png").write_bytes(b"not a png")
        (bad / f"{name}.txt").write_text("a caption")
    with pytest.raises(RuntimeError, match=r"x\.png \(corrupt_image.*y\.png \(corrupt_image"):
        ImageFolderDataset(bad, split="all")  # refused when built, not when first read


def test_a_val_split_whose_images_are_all_corrupt_is_refused_before_training_naming_them(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from unclip.data.folder import split_of

    data, corrupt = tmp_path / "data", []
    data.mkdir()
    for i in range(30):
        name = f"img{i:02d}.png"
        if split_of(name, 0.1) == "val":
            (data / name).write_bytes(b"not a png")
            corrupt.append(name)
        else:
            Image.new("RGB", (32, 32), (8 * i, 0, 0)).save(data / name)
        (data / f"img{i:02d}.txt").write_text(f"a red square {i}")
    assert 1 < len(corrupt) < 10
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train/clip.py", f"hydra.run.dir={out}", "clip=micro_vit", "data=folder", f"data.root={data}",
         "data.val_fraction=0.1", "data.image_size=32", "trainer.max_steps=4", "trainer.batch_size=4",
         "trainer.progress=false", "trainer.mixed_precision=no"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert (f"all {len(corrupt)} images of split 'val' in image folder '{data}' are unusable: {corrupt[0]} "
            f"(corrupt_image: {data / corrupt[0]}") in proc.stderr, proc.stderr[-2000:]
    assert all(f"{name} (corrupt_image" in proc.stderr for name in corrupt)
    assert "Replace or remove these files, or change val_fraction to give the split other images" in proc.stderr
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()  # no step trained


def _captioned_images(root, n: int, prefix: str = "img") -> list[str]:
    """``n`` distinct good images with a caption file each; their names."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{prefix}{i:03d}.png"
        Image.new("RGB", (24, 24), (i % 256, (7 * i) % 256, 90)).save(root / name)
        (root / f"{prefix}{i:03d}.txt").write_text(f"picture {prefix} {i}")
        names.append(name)
    return names


def _build_within(seconds: float, **kwargs):
    """An ImageFolderDataset built in a thread: a walk that hangs (a FIFO opened, a link loop) fails the test."""
    import threading

    result = {}

    def build_it():
        try:
            result["data"] = ImageFolderDataset(image_size=SIZE, **kwargs)
        except Exception as err:  # re-raised below, in the test's thread
            result["error"] = err

    thread = threading.Thread(target=build_it, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"building ImageFolderDataset({kwargs}) hangs"
    if "error" in result:
        raise result["error"]
    return result["data"]


def test_symlink_loops_add_nothing_and_copies_of_an_image_share_one_split(tmp_path):
    import os

    root = tmp_path / "data"
    names = _captioned_images(root, 12)
    os.symlink(root, root / "loop")  # one loop turned 12 images into 492, the same image in train and val
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "back")  # a second loop (two of them hung)
    os.symlink(root / "sub", root / "sub_again")  # a second link to a folder: walked once
    data = _build_within(60, root=root, split="all")
    assert data.files == names and data.index_issues == {"repeated_folder": 3}

    # copies under other names (a hard link, a copy, a link to the file), each with a caption of its own
    os.link(root / names[0], root / "hard.png")
    (root / "copy.png").write_bytes((root / names[1]).read_bytes())
    os.symlink(root / names[2], root / "link.png")
    for name in ("hard", "copy", "link"):
        (root / f"{name}.txt").write_text(f"another caption, {name}")
    data = ImageFolderDataset(root, image_size=SIZE, split="all")
    assert len(data) == 15 and data.index_issues == {"repeated_folder": 3}
    for fraction in (0.2, 0.5, 0.8):
        train = ImageFolderDataset(root, image_size=SIZE, split="train", val_fraction=fraction)
        val = ImageFolderDataset(root, image_size=SIZE, split="val", val_fraction=fraction)
        assert len(train) + len(val) == 15
        train_bytes = {(root / file).read_bytes() for file in train.files}
        assert not train_bytes & {(root / file).read_bytes() for file in val.files}, fraction


def test_fifos_sockets_devices_and_broken_links_named_like_images_are_left_out_unopened(tmp_path):
    import os
    import socket

    root = tmp_path / "data"
    names = _captioned_images(root, 4)
    os.mkfifo(root / "x.png")  # opened for reading, it waited for a writer forever
    os.mkfifo(root / "x2.txt")
    (root / "x2.png").write_bytes((root / names[0]).read_bytes())
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "s.png"))
    os.symlink("/dev/zero", root / "zero.png")
    os.symlink(root / "gone.png", root / "broken.png")
    for name in ("x", "s", "zero", "broken"):
        (root / f"{name}.txt").write_text("a caption")
    data = _build_within(60, root=root, split="all")
    server.close()
    assert data.files == names
    assert data.index_issues == {"not_a_file": 4, "unreadable_file": 1, "missing_caption": 1}

    # a file swapped for a FIFO after indexing is skipped when read, not waited on
    (root / names[1]).unlink()
    os.mkfifo(root / names[1])
    item = data[1]
    assert item["issues"] == {"not_a_file": 1} and item["meta"]["file"] == names[2]
    only_fifos = tmp_path / "only_fifos"
    only_fifos.mkdir()
    os.mkfifo(only_fifos / "a.png")
    with pytest.raises(ValueError, match=r"only_fifos' holds no image files \(extensions PIL opens\); left out: "
                                         r"\{'not_a_file': 1\}"):
        _build_within(60, root=only_fifos)


def test_a_file_name_that_is_not_utf8_is_read_and_named_readably(tmp_path):
    import os

    root = tmp_path / "data"
    _captioned_images(root, 3)
    latin1 = os.fsdecode(b"caf\xe9")  # "café" written in latin-1: crashed naming no file
    Image.new("RGB", (24, 24), BLUE).save(root / f"{latin1}.png")
    (root / f"{latin1}.txt").write_text("a blue square")
    data = ImageFolderDataset(root, image_size=SIZE, split="all")
    assert data.files[0] == "caf\\xe9.png"
    item = data[0]
    assert item["caption"] == "a blue square" and rgb(item) == BLUE and item["meta"]["file"] == "caf\\xe9.png"
    json.dumps(item["meta"], ensure_ascii=False).encode("utf-8")  # loggable
    ImageFolderDataset(root, image_size=SIZE, split="train", val_fraction=0.5)
    ImageFolderDataset(root, image_size=SIZE, split="val", val_fraction=0.5)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / f"{latin1}.png").write_bytes(b"not a png")
    (bad / f"{latin1}.txt").write_text("a caption")
    with pytest.raises(RuntimeError) as info:
        ImageFolderDataset(bad, image_size=SIZE, split="all")
    assert f"all 1 images of split 'all' in image folder '{bad}' are unusable: caf\\xe9.png (corrupt_image: " \
           f"{bad}/caf\\xe9.png: " in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogate
    (bad / f"{latin1}.png").rename(bad / "\x1b[31mred\nline.png")  # a terminal escape and a newline
    (bad / f"{latin1}.txt").rename(bad / "\x1b[31mred\nline.txt")
    with pytest.raises(RuntimeError, match=r"are unusable: \\x1b\[31mred\\x0aline\.png \(corrupt_image"):
        ImageFolderDataset(bad, image_size=SIZE, split="all")


def test_any_run_of_unreadable_files_is_skipped_and_counted_never_fatal(tmp_path):
    root = tmp_path / "data"
    _captioned_images(root, 3, prefix="a")
    for i in range(200):  # 32 in a row crashed training at whatever step reached them
        (root / f"b{i:03d}.png").write_bytes(b"not a png %d" % i)
        (root / f"b{i:03d}.txt").write_text(f"broken {i}")
    _captioned_images(root, 3, prefix="c")
    data = ImageFolderDataset(root, image_size=SIZE, split="all")
    assert len(data) == 206
    reads = Counter()
    read = data._read
    data._read = lambda position: reads.update([position]) or read(position)
    items = [data[i] for i in range(len(data))]  # an epoch, in order
    assert [reads[p] for p in range(3, 203)] == [1] * 200  # each bad file read once, then jumped over
    assert reads[203] == 201 and sum(reads.values()) == 406  # c000 for its own index and for each bad one
    assert total_issues(items) == {"corrupt_image": 200}
    assert {item["meta"]["file"] for item in items[3:203]} == {"c000.png"}  # the next good one
    assert [item["meta"]["file"] for item in items[-3:]] == ["c000.png", "c001.png", "c002.png"]
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, num_workers=2, collate_fn=collate_dicts)
    assert sum(len(batch["caption"]) for batch in loader) == 206


# ----------------------------------------------------------------------------------------------------
# webdataset shards


def _keys(items) -> list[str]:
    return [item["meta"]["key"] for item in items]


def test_dirty_shards_yield_every_good_item_once_and_count_every_problem(tmp_path, dirty_samples):
    urls = write_shards(tmp_path, dirty_samples, 4)
    source = WebDatasetSource(str(tmp_path / "shard-{00..03}.tar"), image_size=SIZE, seed=3)
    assert source.shards == urls
    stream = source.stream(0, 1, seed=3)
    good = _good(dirty_samples)
    expected = Counter(SKIPPED) + Counter(NORMALISED) + Counter({"missing_caption": 1})
    first_order = None
    for _ in range(2):  # two epochs
        items = list(stream)
        assert sorted(_keys(items)) == sorted(good) and total_issues(items) == expected
        for item in items:
            check_item(item)
            assert good[item["meta"]["key"]](item) and item["meta"]["url"] in urls
            if item["meta"]["key"] in CAPTIONS:
                assert item["caption"] == CAPTIONS[item["meta"]["key"]]
        first_order = first_order or _keys(items)
    assert _keys(items) != first_order  # the next epoch is shuffled anew

    ranks = [list(source.stream(rank, 2, seed=3)) for rank in range(2)]
    assert set(_keys(ranks[0])).isdisjoint(_keys(ranks[1]))
    assert sorted(_keys(ranks[0]) + _keys(ranks[1])) == sorted(good)
    assert total_issues(ranks[0]) + total_issues(ranks[1]) == expected
    urls_seen = [{item["meta"]["url"] for item in items} for items in ranks]
    assert urls_seen[0].isdisjoint(urls_seen[1]) and len(urls_seen[0]) == len(urls_seen[1]) == 2


def test_shuffling_follows_the_seed(tmp_path, dirty_samples):
    write_shards(tmp_path, dirty_samples, 2)
    def order(seed):
        return _keys(WebDatasetSource(str(tmp_path / "shard-{00..01}.tar"), image_size=SIZE, seed=seed))
    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    unshuffled = WebDatasetSource(str(tmp_path / "shard-00.tar"), image_size=SIZE, shuffle_buffer=0)
    assert _keys(unshuffled) == sorted(_keys(unshuffled))  # tar order


def test_dataloader_workers_split_the_shards(tmp_path, dirty_samples):
    write_shards(tmp_path, dirty_samples, 4)
    source = WebDatasetSource(sorted(str(p) for p in tmp_path.glob("*.tar")), image_size=SIZE)
    loader = torch.utils.data.DataLoader(source.stream(0, 1, seed=0), batch_size=3, num_workers=2,
                                         collate_fn=collate_dicts)
    batches = list(loader)
    keys = [key for batch in batches for key in (item["key"] for item in batch["meta"])]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(_good(dirty_samples))
    assert batches[0]["image"].shape[1:] == (3, SIZE, SIZE)
    issues = Counter()
    for batch in batches:
        for item_issues in batch["issues"]:
            issues.update(item_issues)
    assert issues == Counter(SKIPPED) + Counter(NORMALISED) + Counter({"missing_caption": 1})

    # 4 shards cannot feed 5 processes, or 3 processes x 2 workers; resampling can
    with pytest.raises(ValueError, match="4 shards cannot be split across 5 processes"):
        source.stream(0, 5)
    # (what a DataLoader worker raises; through a real DataLoader, shutting down the failed workers takes 10 s)
    with pytest.raises(ValueError, match="4 shards cannot be split across 3 processes x 2 data-loader workers"):
        source.stream(1, 3).shards(epoch=0, worker=1, num_workers=2)
    resampled = WebDatasetSource(source.shards, image_size=SIZE, resampled=True, shuffle_buffer=4)
    items = [item for _, item in zip(range(30), resampled.stream(4, 5))]
    assert len(items) == 30 and set(_keys(items)) <= set(_good(dirty_samples))


def test_iter_and_take_for_evaluation(tmp_path, dirty_samples):
    write_shards(tmp_path, dirty_samples, 2)
    source = WebDatasetSource(str(tmp_path / "shard-{00..01}.tar"), image_size=SIZE)
    batch = collate_dicts(source.take(5))
    assert batch["image"].shape == (5, 3, SIZE, SIZE) and len(batch["caption"]) == 5
    assert _keys(source.take(5)) == [meta["key"] for meta in batch["meta"]]  # deterministic
    with pytest.raises(ValueError, match=f"hold only {len(_good(dirty_samples))} good ones"):
        source.take(100)
    with pytest.raises(FileNotFoundError, match="shard-07.tar"):
        WebDatasetSource(str(tmp_path / "shard-07.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar file" * 100)
    with_broken = WebDatasetSource([str(tmp_path / "broken.tar"), *source.shards], image_size=SIZE)
    items = list(with_broken)
    assert len(items) == len(_good(dirty_samples)) and total_issues(items)["bad_shard"] == 1


# ----------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("option,value_overrides", [
    ("folder", ["data.root={folder}", "data.val_fraction=0.3", "data.image_size=16"]),
    ("webdataset", ["data.urls='{shards}/shard-{{00..01}}.tar'", "data.val_urls={shards}/shard-02.tar",
                    "data.image_size=16"]),
])
def test_data_configs_build(tmp_path, dirty_samples, option, value_overrides):
    write_folder(tmp_path / "folder", dirty_samples)
    write_shards(tmp_path / "shards", dirty_samples, 3)
    overrides = [o.format(folder=tmp_path / "folder", shards=tmp_path / "shards") for o in value_overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train_clip", overrides=[f"data={option}", *overrides])
    data = build(OmegaConf.to_container(cfg, resolve=True)["data"])
    first = next(iter(data["val"])) if option == "webdataset" else data["val"][0]
    check_item(first)
    assert first["image"].shape == (3, 16, 16)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        unset = compose(config_name="train_clip", overrides=[f"data={option}"])
    with pytest.raises(Exception, match="data.root" if option == "folder" else "data.urls"):
        OmegaConf.to_container(unset, resolve=True)


# ----------------------------------------------------------------------------------------------------
# a training job on dirty data


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_clip_job_trains_through_dirty_data_and_reports_the_counts(tmp_path, dirty_samples, source):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    if source == "folder":
        write_folder(tmp_path / "data", dirty_samples)
        data = ["data=folder", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.3"]
    else:
        shards = write_shards(tmp_path / "shards", dirty_samples, 4)
        data = ["data=webdataset", f"data.urls=[{','.join(shards[:3])}]", f"data.val_urls=[{shards[3]}]",
                "data.train.shuffle_buffer=10"]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train/clip.py", f"hydra.run.dir={out}", "clip=micro_vit", "data.image_size=32", *data,
         "trainer.max_steps=6", "trainer.batch_size=4", "trainer.warmup_steps=1", "trainer.checkpoint_every=0",
         "trainer.progress=false", "trainer.mixed_precision=no"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    issues = metrics["data_issues"]
    # 24 items drawn from ~10 training files: every kind of problem among them was met, counted and survived
    assert issues.get("mode_converted", 0) > 0
    assert sum(n for reason, n in issues.items() if reason in SKIPPED) > 0
    assert set(issues) <= set(SKIPPED) | set(NORMALISED) | {"missing_caption", "control_chars_stripped"}
    if source == "folder":  # the image without a caption file is left out when the folder is indexed
        assert issues["missing_caption"] == 1 and "files left out: missing_caption 1" in proc.stdout
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert epochs and "epoch" in proc.stdout + proc.stderr and "data issues" in proc.stdout + proc.stderr


def test_val_shards_whose_images_are_all_corrupt_name_the_shards_and_the_way_out(tmp_path):
    from unclip.data.collate import first_items

    corrupt = [(f"bad{i}", "png", b"not a png", b"a caption", None) for i in range(3)]
    shards = write_shards(tmp_path / "val", corrupt, 1)
    with pytest.raises(RuntimeError, match=re.escape(
            f"no readable sample in the shards of rank 0 worker 0 in epoch 0 (first shards {shards}; problems "
            "{'corrupt_image': 3}); replace their unreadable samples, or give other shards")):
        first_items(WebDatasetSource(shards, image_size=SIZE), 4)
    with pytest.raises(ValueError, match=re.escape(
            "no items to evaluate on in []: it is empty, or none of its items could be read (corrupt images, missing "
            "or empty captions); give it readable images with captions")):
        first_items([], 4)
