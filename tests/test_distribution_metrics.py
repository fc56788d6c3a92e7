"""FID, KID and precision/recall (unclip.eval.distribution): closed forms on Gaussians, the orderings a user reads
them by, the feature spaces' errors, and the calibration rows on real images through a CLIP."""

import pytest
import torch
from conftest import MICRO_CLIP

from unclip.clip import OpenClipEncoder
from unclip.data.shapes import ShapesDataset
from unclip.eval.distribution import (
    calibration,
    clip_features,
    distribution_metrics,
    feature_space,
    frechet_distance,
    kernel_distance,
    precision_recall,
    trivial_images,
)


def gaussian(n, dim, seed, mean=0.0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) * scale + mean


def test_fid_matches_the_closed_form_of_two_gaussians():
    # N(0, I) against N(m, s^2 I): FID = |m|^2 + D (1 + s^2 - 2 s)
    dim, shift, scale = 4, 0.5, 2.0
    real, fake = gaussian(20000, dim, 0), gaussian(20000, dim, 1, mean=shift, scale=scale)
    expected = dim * shift**2 + dim * (1 + scale**2 - 2 * scale)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    real, same, shifted = gaussian(600, 8, 0), gaussian(600, 8, 1), gaussian(600, 8, 2, mean=0.5)
    mean_same, std_same = kernel_distance(real, same)
    mean_shift, _ = kernel_distance(real, shifted)
    assert abs(mean_same) < 3 * std_same + 1e-3
    assert std_same > 0  # the subsets differ (half the set each), so the std says how noisy the mean is
    assert mean_shift > 10 * max(abs(mean_same), 1e-3)
    assert kernel_distance(real, same, seed=3) == kernel_distance(real, same, seed=3)


def test_precision_and_recall_separate_quality_from_diversity():
    real = gaussian(500, 4, 0)
    collapsed = gaussian(500, 4, 1, scale=0.05)  # every sample good, no variety: precision high, recall low
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.2
    wide = gaussian(500, 4, 2, scale=3.0)  # variety beyond the data: recall high, precision low
    precision, recall = precision_recall(real, wide)
    assert recall > 0.9 and precision < 0.5
    assert precision_recall(real, gaussian(500, 4, 3, mean=20.0)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3 images in each set, got 3 real"):
        precision_recall(real[:3], wide)


def test_every_key_names_its_feature_space_and_the_count():
    metrics = distribution_metrics(gaussian(64, 4, 0), gaussian(80, 4, 1), "clip")
    assert set(metrics) == {"fid_clip", "kid_clip_mean", "kid_clip_std", "precision_clip", "recall_clip",
                            "n_fid_clip"}
    assert metrics["n_fid_clip"] == 64


def test_too_few_images_for_the_dimension_warn_naming_both_numbers():
    with pytest.warns(UserWarning, match="FID from 20 images in a 32-d feature space"):
        distribution_metrics(gaussian(20, 32, 0), gaussian(20, 32, 1), "clip")


def test_non_finite_features_are_refused():
    fake = gaussian(10, 4, 1)
    fake[3, 1] = float("nan")
    with pytest.raises(ValueError, match="generated images' clip features are not finite"):
        distribution_metrics(gaussian(10, 4, 0), fake, "clip")


def test_feature_spaces_never_download_and_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="unknown metrics.features 'fid'; choose one of clip, inception, open_clip"):
        feature_space("fid")
    with pytest.raises(ValueError, match="needs the Inception weights file: metrics.inception_weights="):
        feature_space("inception")
    missing = tmp_path / "pt_inception.pth"
    with pytest.raises(FileNotFoundError, match=f"metrics.inception_weights={missing}: no such file"):
        feature_space("inception", inception_weights=missing)
    with pytest.raises(ValueError, match="needs metrics.open_clip_model"):
        feature_space("open_clip", open_clip_model="ViT-B-32")
    with pytest.raises(FileNotFoundError, match="metrics.open_clip_weights=.*no such file"):
        feature_space("open_clip", open_clip_model="ViT-B-32", open_clip_weights=tmp_path / "w.bin")
    with pytest.raises(ValueError, match="needs the pipeline's CLIP"):
        feature_space("clip")


def test_calibration_rows_on_real_images_bracket_the_distances():
    torch.manual_seed(0)
    clip = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro").eval()
    data = ShapesDataset(split="train", length=96, seed=0, image_size=32)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    features = clip_features(clip)
    assert features(images[:5]).shape == (5, clip.space.dim)
    rows = calibration(features, images[:48], images[48:])
    assert set(rows) == {"fid_clip_floor", "fid_clip_ceiling_mean", "fid_clip_ceiling_noise", "n_fid_clip_calibration"}
    assert rows["n_fid_clip_calibration"] == 48
    assert 0 <= rows["fid_clip_floor"] < rows["fid_clip_ceiling_mean"]
    assert rows["fid_clip_floor"] < rows["fid_clip_ceiling_noise"]
    mean_images = trivial_images(images, "mean")
    assert torch.allclose(mean_images[0], mean_images[-1]) and mean_images.shape == images.shape


def test_inception_features_load_the_users_weights_file_and_never_download(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    def no_download(*args, **kwargs):
        raise AssertionError("the Inception weights were fetched from the network")

    # a weights file of the standard FID network's layout (random values: what matters is the path it takes)
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict(), weights)
    monkeypatch.undo()
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", no_download)

    features = feature_space("inception", inception_weights=weights)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = features(images)
    assert features.name == "inception" and out.shape == (3, 2048) and torch.isfinite(out).all()


def _micro_pipeline():
    from stages import micro_stages

    from unclip.pipelines import GenerationSettings, UnCLIPPipeline

    clip, prior, decoder, upsampler = micro_stages()
    return UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, upsamplers=[upsampler],
                          settings=GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2))


def test_the_shapes_evaluation_reports_distribution_metrics_beside_the_judge():
    from unclip.eval.shapes import ShapesEvaluator

    pipe = _micro_pipeline()
    splits = {"val": ShapesDataset(split="val", length=4)}
    items = {"fidelity": {"val": 10, "pair": 6}}
    metrics = ShapesEvaluator(splits, pipeline_items=items, metrics={}).pipeline_metrics(pipe, seed=0, edits=False)
    assert metrics["fidelity/val/n"] == 10 and metrics["distribution/n_fid_clip"] == 16  # the judged images, all splits
    assert {"distribution/fid_clip", "distribution/kid_clip_mean", "distribution/precision_clip",
            "distribution/recall_clip", "distribution/clip_score", "distribution/fid_clip_floor",
            "distribution/fid_clip_ceiling_mean", "distribution/fid_clip_ceiling_noise"} <= set(metrics)
    off = ShapesEvaluator(splits, pipeline_items=items, metrics={"enabled": False}).pipeline_metrics(pipe, seed=0, edits=False)
    assert not any(key.startswith("distribution/") for key in off) and "fidelity/val/n" in off
    with pytest.raises(ValueError, match=r"unknown metrics settings \['feature'\]"):
        ShapesEvaluator(splits, metrics={"feature": "clip"})
    with pytest.raises(ValueError, match="unknown metrics.features 'incepton'; choose one of clip, inception"):
        ShapesEvaluator(splits, metrics={"features": "incepton"})


def _digit_folder(root, count=24):
    """A folder of handwritten-like digits (an MNIST-like case), captioned by name.txt files."""
    from PIL import Image, ImageDraw

    root.mkdir()
    for i in range(count):
        image = Image.new("RGB", (16, 16), "black")
        ImageDraw.Draw(image).text((5, 2), str(i % 10), fill="white")
        image.save(root / f"digit{i:03d}.png")
        (root / f"digit{i:03d}.txt").write_text(f"a handwritten {i % 10}")
    return root


@pytest.mark.slow
def test_evaluate_job_on_a_folder_of_digits_computes_the_metrics_offline(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stages import save_micro_pipeline

    stages = save_micro_pipeline(tmp_path / "stages")
    root = Path(__file__).resolve().parents[1]
    pipeline = [f"pipeline.{name}={path}" for name, path in stages.items() if name != "upsamplers"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "train/evaluate.py", *pipeline, f"pipeline.upsamplers=[{stages['upsamplers'][0]}]",
           "data=folder", f"data.root={_digit_folder(tmp_path / 'digits')}", "data.image_size=32", "data.val_fraction=0.5",
           "eval_items={val:6}", "pipeline.settings.prior_steps=2", "pipeline.settings.decoder_steps=2",
           "pipeline.settings.upsampler_steps=2", f"hydra.run.dir={tmp_path / 'evaluate'}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert {"val_clip_score", "distribution/val/fid_clip", "distribution/val/kid_clip_mean",
            "distribution/val/precision_clip", "distribution/val/fid_clip_ceiling_noise"} <= set(metrics)
    assert metrics["distribution/val/n_fid_clip"] == 6
