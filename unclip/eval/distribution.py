"""Distribution metrics between generated and real images: FID, KID, precision/recall, in a named feature space.

    features = feature_space("clip", clip=pipe.clip)             # the pipeline's own CLIP image tower (offline)
    real, fake = features(real_images), features(generated)       # [N, D] each, computed once
    distribution_metrics(real, fake, features.name)               # fid_clip, kid_clip_mean, precision_clip, ...

Every key names its feature space (``fid_clip``, ``fid_inception``): numbers from two spaces are not comparable.
Features are extracted once per image set and shared by every metric; the statistics themselves are torchmetrics'
(FrechetInceptionDistance, KernelInceptionDistance, fed the features through a pass-through extractor). Improved
precision and recall (Kynkäänniemi et al. 2019, k-NN manifolds) are written here: no maintained library has them.

FID is biased by the sample count (smaller sets read higher), so every FID is reported with ``n_fid``; compare runs
only at equal counts. :func:`calibration` gives the two rows a number is read against: the floor (two disjoint real
sets of the same size) and the ceiling (real images against a trivial generator: the mean image, and noise).

Nothing here downloads: ``inception`` needs the standard FID network's weights as a local file
(``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's port), named by ``inception_weights``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

FEATURE_SPACES = ("clip", "inception", "open_clip")
KNN_K = 3  # Kynkäänniemi et al.'s k for the manifolds' radii


class ImageFeatures:
    """A named feature extractor: ``features(images)`` with images [N, 3, H, W] in [-1, 1] -> float64 [N, dim]."""

    def __init__(self, name: str, extract: Callable[[torch.Tensor], torch.Tensor], dim: int, batch_size: int = 64):
        self.name, self.dim, self._extract, self.batch_size = name, dim, extract, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor [N, 3, H, W] in [-1, 1], got {getattr(images, 'shape', images)!r}")
        parts = [self._extract(images[i : i + self.batch_size]).double().cpu()
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, dtype=torch.float64)


def clip_features(clip, name: str = "clip") -> ImageFeatures:
    """A CLIP image tower's unit-norm image embeddings (images resized to the CLIP's input size)."""
    from unclip.clip.evaluation import embed_images

    return ImageFeatures(name, lambda images: embed_images(clip, images.float(), len(images)), clip.space.dim)


def inception_features(weights: str | Path | None, device: str | torch.device = "cpu") -> ImageFeatures:
    """The standard FID network (Inception-v3, 2,048-d pool features) from a local weights file; never downloads."""
    if weights is None or str(weights) in ("", "None"):
        raise ValueError("metrics.features=inception needs the Inception weights file: "
                         "metrics.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth "
                         "(nothing is downloaded); or use metrics.features=clip")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"metrics.inception_weights={weights}: no such file; give the path of the Inception "
                                "weights (pt_inception-2015-12-05-6726825d.pth), nothing is downloaded")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise ImportError("metrics.features=inception needs the torch-fidelity package (pip install torch-fidelity); "
                          "or use metrics.features=clip") from err
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    net = net.to(device).eval()

    def extract(images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(device)
        return net(pixels)[0].reshape(len(images), -1)

    return ImageFeatures("inception", extract, 2048)


def open_clip_features(model: str, weights: str | Path, device: str | torch.device = "cpu") -> ImageFeatures:
    """Another open_clip model's image embeddings (e.g. a larger CLIP a user has as a local file), through the
    CLIP stage's own encoder (``OpenClipEncoder``: its weights loading and image preprocessing)."""
    from unclip.clip import OpenClipEncoder

    if not Path(weights).expanduser().is_file():
        raise FileNotFoundError(f"metrics.open_clip_weights={weights}: no such file; give a local open_clip "
                                f"checkpoint of {model} (nothing is downloaded)")
    encoder = OpenClipEncoder(model_name=model, checkpoint=str(Path(weights).expanduser()), name=model)
    return clip_features(encoder.to(device).eval(), "open_clip")


def feature_space(name: str, *, clip=None, inception_weights=None, open_clip_model: str | None = None,
                  open_clip_weights=None, device: str | torch.device = "cpu") -> ImageFeatures:
    """The features named by ``metrics.features``."""
    if name == "clip":
        if clip is None:
            raise ValueError("metrics.features=clip needs the pipeline's CLIP")
        return clip_features(clip)
    if name == "inception":
        return inception_features(inception_weights, device)
    if name == "open_clip":
        if not open_clip_model or not open_clip_weights:
            raise ValueError("metrics.features=open_clip needs metrics.open_clip_model (e.g. ViT-B-32) and "
                             "metrics.open_clip_weights (a local checkpoint file)")
        return open_clip_features(open_clip_model, open_clip_weights, device)
    raise ValueError(f"unknown metrics.features {name!r}; choose one of {', '.join(FEATURE_SPACES)}")


class _GivenFeatures(nn.Module):
    """torchmetrics' feature extractor slot, when the features are already extracted: passes them through."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_features(real: torch.Tensor, fake: torch.Tensor, space: str) -> None:
    for which, features in (("real", real), ("generated", fake)):
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"{which} features must be [N >= 2, D], got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError(f"the {which} images' {space} features are not finite (NaN/inf images?)")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features are {real.shape[1]}-d but generated ones {fake.shape[1]}-d: one space for both")
    dim, count = real.shape[1], min(len(real), len(fake))
    if count < dim:
        warnings.warn(f"FID from {count} images in a {dim}-d feature space ({space}): fewer images than dimensions "
                      "make the covariance singular and the FID unstable and biased high; use at least "
                      f"{dim} images, or compare only runs at this same count", stacklevel=3)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, D] (torchmetrics' FrechetInceptionDistance on the given features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 50, subset_size: int | None = None,
                    seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size``; default: half the smaller set, at most
    1,000, so that the subsets differ and the std says how noisy the mean is), torchmetrics' KernelInceptionDistance
    (cubic polynomial kernel) on the given features."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = subset_size or min(1000, max(2, min(len(real), len(fake)) // 2))
    if size > min(len(real), len(fake)):
        raise ValueError(f"KID subset_size {size} is larger than the sets ({len(real)} real, {len(fake)} generated)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets are drawn from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour within its own set (itself excluded)."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def _coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``points`` inside at least one ball (manifold point, its radius)."""
    inside = torch.zeros(len(points), dtype=torch.bool)
    for start in range(0, len(points), 1024):
        distances = torch.cdist(points[start : start + 1024], manifold)
        inside[start : start + 1024] = (distances <= radii[None, :]).any(dim=1)
    return inside.float().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision (share of generated images on the real images' k-NN manifold: quality) and recall (share of
    real images on the generated images' manifold: diversity), Kynkäänniemi et al. 2019."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images in each set, got {len(real)} real "
                         f"and {len(fake)} generated")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _radii(real, k))
    recall = _coverage(real, fake, _radii(fake, k))
    return precision, recall


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, space: str, *, kid_subsets: int = 50,
                         seed: int = 0) -> dict[str, float]:
    """FID, KID, precision and recall of generated features against real ones, keyed by the feature space:
    ``fid_<space>``, ``kid_<space>_mean``/``_std``, ``precision_<space>``, ``recall_<space>``, and ``n_fid_<space>``
    (the smaller set's size: FID depends on it)."""
    _check_features(real, fake, space)
    kid_mean, kid_std = kernel_distance(real, fake, subsets=kid_subsets, seed=seed)
    precision, recall = precision_recall(real, fake)
    return {f"fid_{space}": frechet_distance(real, fake), f"kid_{space}_mean": kid_mean, f"kid_{space}_std": kid_std,
            f"precision_{space}": precision, f"recall_{space}": recall, f"n_fid_{space}": min(len(real), len(fake))}


def trivial_images(real_images: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """A trivial generator's output, as many as ``real_images``: ``mean`` (every image the real set's mean image) or
    ``noise`` (uniform pixels)."""
    if kind == "mean":
        return real_images.float().mean(dim=0, keepdim=True).expand_as(real_images).clone()
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(real_images.shape, generator=generator) * 2 - 1
    raise ValueError(f"unknown trivial generator {kind!r}; choose mean or noise")


def calibration(features: ImageFeatures, real_a: torch.Tensor, real_b: torch.Tensor, *, seed: int = 0) -> dict:
    """The rows an FID is read against, from two disjoint real image sets of the same size: the floor (real against
    real: what sampling noise alone gives at this count) and the ceilings (real against the mean image, and against
    noise). Keys ``fid_<space>_floor``, ``fid_<space>_ceiling_mean``, ``fid_<space>_ceiling_noise``, and
    ``n_fid_<space>_calibration``."""
    space = features.name
    fa, fb = features(real_a), features(real_b)
    _check_features(fa, fb, space)
    rows = {f"fid_{space}_floor": frechet_distance(fa, fb)}
    for kind in ("mean", "noise"):
        fake = features(trivial_images(real_b, kind, seed))
        # the mean image's features are one point: jitter-free FID still works (zero covariance)
        rows[f"fid_{space}_ceiling_{kind}"] = frechet_distance(fa, fake)
    rows[f"n_fid_{space}_calibration"] = min(len(fa), len(fb))
    return rows


@dataclass
class MetricsSettings:
    """The ``metrics:`` node of the jobs (conf/metrics/default.yaml): which feature space, and what to compute."""

    features: str = "clip"  # clip | inception | open_clip
    inception_weights: str | None = None  # features=inception: the standard FID network's weights file
    open_clip_model: str | None = None  # features=open_clip: a model name (e.g. ViT-B-32) ...
    open_clip_weights: str | None = None  # ... and its local checkpoint file
    kid_subsets: int = 50
    calibration: bool = True  # the floor and ceiling rows beside every pipeline FID
    enabled: bool = True

    @classmethod
    def from_config(cls, config: dict | None) -> "MetricsSettings | None":
        """The settings of a ``metrics:`` node (None or ``enabled: false``: no distribution metrics)."""
        if config is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown metrics settings {unknown}; known: {sorted(known)}")
        settings = cls(**config)
        if settings.features not in FEATURE_SPACES:
            raise ValueError(f"unknown metrics.features {settings.features!r}; choose one of {', '.join(FEATURE_SPACES)}")
        if isinstance(settings.kid_subsets, bool) or not isinstance(settings.kid_subsets, int) or settings.kid_subsets < 1:
            raise ValueError(f"metrics.kid_subsets must be an int >= 1, got {settings.kid_subsets!r}")
        return settings if settings.enabled else None

    def space(self, clip=None, device: str | torch.device = "cpu") -> ImageFeatures:
        return feature_space(self.features, clip=clip, inception_weights=self.inception_weights,
                             open_clip_model=self.open_clip_model, open_clip_weights=self.open_clip_weights,
                             device=device)


def image_set_metrics(features: ImageFeatures, generated: torch.Tensor, real: torch.Tensor, *, kid_subsets: int = 50,
                      seed: int = 0) -> dict:
    """Distribution metrics of ``generated`` images against ``real`` ones (the data's images of the same captions),
    each set's features extracted once."""
    return distribution_metrics(features(real), features(generated), features.name, kid_subsets=kid_subsets, seed=seed)
