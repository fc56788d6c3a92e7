"""Web-like garbage in place of a share of the training captions (``data.caption_noise``): what web data is like.

Scraped pairs often have a caption with nothing to do with the image. :class:`CaptionNoise` replaces a share
``fraction`` of a source's training captions with one of five kinds of garbage, in equal shares (``SHARES``):

* ``id``: a file name or id ("IMG_4821.JPG", "DSC01234.jpg", a hex hash, a UUID);
* ``url``: a web address ("https://cdn.imghost.net/a8f3/b71c.jpg");
* ``mojibake``: accented or emoji text whose UTF-8 bytes were read as cp1252 ("CafÃ© crÃ¨me ðŸ°");
* ``spam``: advertising ("BEST PRICE sneakers free shipping click here");
* ``other``: the caption of another training item (a mismatched pair; ``spam`` where the source has no other item).

Whether an item is noised, and with what, is drawn from ``random.Random(f"caption_noise/{seed}/{key}")``, ``key``
the item's index (a webdataset sample's shard and key): the same item gets the same caption in every run, epoch,
worker and resume, and at a larger fraction the items noised at a smaller one stay noised with the same garbage.
The garbage goes in after the source's cleaning (:mod:`unclip.data.cleaning`): it is what reaches the model. A
noised item's ``meta`` says so (``caption_noised``: True, ``caption_noise_kind``: the kind; False / None on the
others), which lets ``train/embed.py``'s CLIP-score filter report how many of the pairs it drops were garbage. At
``fraction`` 0 items are left exactly as the source made them. Only training captions are noised: val, held-out and
the evaluators' splits never (a source refuses ``caption_noise`` on another split).
"""

from __future__ import annotations

import random
import uuid
from typing import Callable

KINDS = ("id", "url", "mojibake", "spam", "other")
SHARES = dict.fromkeys(KINDS, 0.2)  # each kind's share of the noised captions

_WORDS = ("watches", "sneakers", "phone case", "sunglasses", "handbags", "vitamins", "jerseys", "led lights",
          "wedding dress", "car parts", "perfume", "gaming chair")
_SPAM = ("BEST PRICE {w} free shipping click here", "Buy cheap {w} online!!! {n}% OFF today only",
         "Hot deals - {w} - limited offer, order now", "Click here to WIN a free {w}",
         "{w} wholesale factory direct, contact us for price", "100% authentic {w} cheap sale {n}% off")
_HOSTS = ("cdn.imghost.net", "www.best-deals24.biz", "images.example-shop.com", "i.pinimg.example", "static.blogspot.example")
# text whose UTF-8 bytes become mojibake when read as cp1252
_FOREIGN = ("Café crème brûlée 🍮", "Schöne Grüße aus München", "niño pequeño en la playa", "São Paulo ☀️ verão",
            "naïve façade 😊", "Zürich Straße", "Łódź, Polska", "Ελληνικά νησιά", "日本語のテキスト", "Привет из Москвы",
            "fête à Noël 🎄", "smörgåsbord för två")


def check_caption_noise(fraction, source: str) -> float:
    """``fraction`` as a float in [0, 1), else a ValueError naming the value and the source."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(
            f"caption_noise must be in [0, 1) (the share of training captions replaced by garbage), got {fraction!r} "
            f"for {source}; set data.caption_noise to e.g. 0.2, or 0 for clean captions")
    return float(fraction)


def _id(rng: random.Random) -> str:
    form = rng.randrange(4)
    if form == 0:
        return f"{rng.choice(('IMG', 'DSC', 'DSCN', 'P'))}_{rng.randrange(10000):04d}.{rng.choice(('JPG', 'jpg', 'jpeg'))}"
    if form == 1:
        return f"{rng.randrange(2010, 2024)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}_{rng.randrange(240000):06d}.jpg"
    if form == 2:
        return f"{rng.getrandbits(128):032x}"[: rng.choice((12, 16, 32))]
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _url(rng: random.Random) -> str:
    path = "/".join(f"{rng.getrandbits(16):04x}" for _ in range(rng.randrange(1, 4)))
    tail = rng.choice((".jpg", ".png", f"?ref=img&id={rng.randrange(10**6)}", ".html"))
    return f"{rng.choice(('http', 'https'))}://{rng.choice(_HOSTS)}/{path}{tail}"


def mojibake(text: str) -> str:
    """``text``'s UTF-8 bytes read as cp1252 (bytes cp1252 leaves undefined dropped): "Café" -> "CafÃ©"."""
    return text.encode("utf-8").decode("cp1252", errors="ignore")


def _mojibake(rng: random.Random) -> str:
    return mojibake(" ".join(rng.sample(_FOREIGN, rng.randrange(1, 3))))


def _spam(rng: random.Random) -> str:
    return rng.choice(_SPAM).format(w=rng.choice(_WORDS), n=rng.choice((30, 50, 70, 90)))


_MAKERS = {"id": _id, "url": _url, "mojibake": _mojibake, "spam": _spam}


def other_index(rng: random.Random, n: int, index: int) -> int | None:
    """Another index than ``index`` of ``n``, uniformly (None when there is no other)."""
    if n < 2:
        return None
    j = rng.randrange(n - 1)
    return j + (j >= index)


class CaptionNoise:
    """Replaces a share ``fraction`` of a training split's captions with garbage (see module)."""

    def __init__(self, fraction: float, seed: int = 0, *, source: str, split: str = "train"):
        self.fraction, self.seed = check_caption_noise(fraction, source), int(seed)
        if self.fraction and split != "train":
            raise ValueError(f"caption_noise={fraction} for {source}: only training captions are noised, not split "
                             f"{split!r} (its captions judge the model); give caption_noise to the train split only")

    def __bool__(self) -> bool:
        return self.fraction > 0

    def draw(self, key) -> tuple[str | None, random.Random]:
        """The kind of garbage item ``key`` gets (None: its caption is kept) and the generator to make it with."""
        rng = random.Random(f"caption_noise/{self.seed}/{key}")
        if rng.random() >= self.fraction:
            return None, rng
        u, total = rng.random(), 0.0
        for kind in KINDS:
            total += SHARES[kind]
            if u < total:
                return kind, rng
        return KINDS[-1], rng

    def apply(self, item: dict, key, other: Callable[[random.Random], str | None] | None = None) -> dict:
        """``item`` with its caption replaced if ``key`` is drawn for garbage, and ``meta`` saying so (unchanged at
        fraction 0). ``other(rng)``: another training item's caption, picked with ``rng`` (None: there is none)."""
        if not self:
            return item
        kind, rng = self.draw(key)
        if kind == "other":
            caption = other(rng) if other is not None else None
            if caption is None:  # no other item to take a caption from
                kind = "spam"
        if kind in _MAKERS:
            caption = _MAKERS[kind](rng)
        if kind is not None:
            item["caption"] = caption
        item["meta"] = {**(item.get("meta") or {}), "caption_noised": kind is not None, "caption_noise_kind": kind}
        return item


def others_of(n: int, index: int, caption_of: Callable[[int], str | None]) -> Callable[[random.Random], str | None]:
    """``other`` for :meth:`CaptionNoise.apply` in a map-style split of ``n`` items: the caption of another item."""
    def other(rng: random.Random) -> str | None:
        j = other_index(rng, n, index)
        return None if j is None else caption_of(j)
    return other
