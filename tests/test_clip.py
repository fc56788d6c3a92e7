import warnings
from pathlib import Path

import pytest
import torch

from unclip.clip import ContrastiveLoss, OpenClipEncoder, clamp_logit_scale, retrieval_recall, zero_shot_top1
from unclip.embedding import ClipEncoder, TextCondition


def test_encoder_follows_the_protocol_and_shapes(micro_clip):
    assert isinstance(micro_clip, ClipEncoder)
    space = micro_clip.space
    assert (space.dim, space.text_length, space.token_dim, space.image_size) == (32, 16, 32, 32)
    cond = micro_clip.encode_text(["a red circle", "a small blue square on the left side"])
    assert isinstance(cond, TextCondition)
    assert cond.embed.shape == (2, 32) and cond.tokens.shape == (2, 16)
    assert cond.token_embeds.shape == (2, 16, 32) and cond.mask.shape == (2, 16)
    torch.testing.assert_close(cond.embed.norm(dim=-1), torch.ones(2))
    # start token + words + end token are real; the rest is padding
    assert cond.mask[0].tolist() == [True] * 5 + [False] * 11
    assert cond.mask[1].sum() > cond.mask[0].sum()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    image_embed = micro_clip.encode_image(images)
    assert image_embed.shape == (3, 32)
    torch.testing.assert_close(image_embed.norm(dim=-1), torch.ones(3))


def test_token_states_are_the_text_transformers_last_hidden_states(micro_clip):
    cond = micro_clip.encode_text(["a green triangle"])
    model = micro_clip.model
    x = model.token_embedding(cond.tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    torch.testing.assert_close(cond.token_embeds, x)
    # and the pooled embedding is open_clip's own
    torch.testing.assert_close(cond.embed, model.encode_text(cond.tokens, normalize=True))


def test_images_of_another_size_are_resized(micro_clip):
    small = micro_clip.encode_image(torch.zeros(1, 3, 64, 64))
    assert small.shape == (1, 32)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        micro_clip.encode_image(torch.zeros(1, 4, 32, 32))


def test_long_caption_is_truncated_with_a_warning(micro_clip):
    with pytest.warns(UserWarning, match="truncated"):
        tokens = micro_clip.tokenize(["a red circle " * 30])
    assert tokens.shape == (1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro_clip.tokenize(["a red circle"])  # short: no warning


def test_unknown_model_name_lists_known_models():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-Q-99'.*ViT-B-32"):
        OpenClipEncoder(model_name="ViT-Q-99")
    with pytest.raises(ValueError, match="nothing is fetched"):
        OpenClipEncoder(model_name="hf-hub:laion/CLIP-ViT-B-32")


def test_named_architecture_builds_with_random_weights():
    encoder = OpenClipEncoder(model_name="RN50")
    assert encoder.space.dim == 1024 and encoder.space.image_size == 224


def test_fingerprint_follows_the_weights(micro_clip):
    before = micro_clip.space.fingerprint
    assert micro_clip.compute_space().fingerprint == before  # stable
    with torch.no_grad():
        micro_clip.model.logit_scale.add_(1.0)
    assert micro_clip.compute_space().fingerprint != before


def test_contrastive_loss_prefers_aligned_pairs(micro_clip):
    torch.manual_seed(0)
    loss_fn = ContrastiveLoss()
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    captions = [f"a {c} circle" for c in ["red", "blue", "green", "pink", "cyan", "orange", "purple", "yellow"]]
    # Make the encoder "perfect" on this batch by training a few steps, then compare aligned vs shuffled.
    opt = torch.optim.Adam(micro_clip.parameters(), lr=3e-3)
    for _ in range(40):
        loss = loss_fn(micro_clip, {"image": images, "caption": captions})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        aligned = loss_fn(micro_clip, {"image": images, "caption": captions})["loss"]
        shuffled = loss_fn(micro_clip, {"image": images, "caption": captions[1:] + captions[:1]})["loss"]
    assert aligned < 0.5 < shuffled, (aligned, shuffled)


def test_contrastive_loss_is_log_n_for_uninformative_features(micro_clip):
    with torch.no_grad():
        micro_clip.model.logit_scale.fill_(0.0)  # temperature 1, cosine similarities in [-1, 1]
    images = torch.zeros(4, 3, 32, 32)
    out = ContrastiveLoss()(micro_clip, {"image": images, "caption": ["a red circle"] * 4})
    torch.testing.assert_close(out["loss"], torch.tensor(4.0).log(), atol=1e-4, rtol=0)


def test_logit_scale_is_clamped_at_100(micro_clip):
    with torch.no_grad():
        micro_clip.model.logit_scale.fill_(10.0)
    clamp_logit_scale(micro_clip)
    assert micro_clip.logit_scale.exp().item() == pytest.approx(100.0)


def test_retrieval_recall_and_zero_shot():
    embeds = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    perfect = retrieval_recall(embeds, embeds)
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0
    reversed_texts = embeds.flip(0)
    worst = retrieval_recall(embeds, reversed_texts, ks=(1,))
    assert worst["image_to_text_R@1"] <= 0.1
    collapsed = retrieval_recall(torch.ones(5, 8), torch.ones(5, 8), ks=(1,))
    assert collapsed["image_to_text_R@1"] == 0.0  # ties count against the true match
    labels = torch.arange(20) % 4
    classes = torch.stack([embeds[labels == k].mean(0) for k in range(4)])
    assert zero_shot_top1(embeds, classes, labels) > 0.5


def test_default_clip_codes_patch_positions_with_fixed_sin_cos(tmp_path):
    """conf/clip/tiny_vit.yaml (the demo's CLIP): the patch positions are MAE's 2-D sin-cos codes, which training
    leaves as they are and a saved stage brings back."""
    from omegaconf import OmegaConf
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    from unclip.checkpoint import load_stage, save_stage
    from unclip.config import build

    conf = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "clip" / "tiny_vit.yaml"))
    clip = build(conf)
    positions = clip.model.visual.positional_embedding
    grid = clip.space.image_size // conf["model_cfg"]["vision_cfg"]["patch_size"]
    expected = torch.from_numpy(get_2d_sincos_pos_embed(positions.shape[1], grid, cls_token=True)).float()
    torch.testing.assert_close(positions.detach(), expected)
    images, captions = torch.rand(4, 3, 64, 64) * 2 - 1, ["a red circle", "a blue square", "a cyan diamond", "a tiny dot"]
    optimizer = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=1e-2)
    ContrastiveLoss()(clip, {"image": images, "caption": captions})["loss"].backward()
    optimizer.step()
    torch.testing.assert_close(positions.detach(), expected)
    save_stage(tmp_path / "clip", clip, stage="clip", space=clip.space)
    loaded = load_stage(tmp_path / "clip", stage="clip").model
    torch.testing.assert_close(loaded.model.visual.positional_embedding.detach(), expected)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), clip.encode_image(images))


def test_a_nan_clip_retrieves_nothing_instead_of_everything():
    """A CLIP whose weights went NaN makes NaN similarities; every comparison with NaN is false, so counted naively
    the true match outranks everything and R@1 = 1.0. Non-finite similarities are misses."""
    nan = torch.full((6, 8), float("nan"))
    finite = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert set(retrieval_recall(nan, nan).values()) == {0.0}
    assert set(retrieval_recall(finite, nan).values()) == {0.0}
    one_bad = finite.clone()
    one_bad[2] = float("nan")  # one NaN caption: its pair is a miss, and it outranks the others' true matches
    assert retrieval_recall(finite, one_bad, ks=(1,))["image_to_text_R@1"] == 0.0
    assert zero_shot_top1(nan, finite[:4], torch.zeros(6, dtype=torch.long)) == 0.0  # argmax would pick class 0
