"""DALL-E 2's autoregressive prior (unclip.prior.AutoregressivePrior): its PCA and buckets, training, sampling,
checkpoints, its place in UnCLIPPipeline, and train/prior.py prior=autoregressive killed and resumed."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from stages import kill_after_step, micro_stages, run_job, save_micro_pipeline

from unclip.checkpoint import load_stage, save_stage
from unclip.data.embeddings import write_embedding_shards
from unclip.data.shapes import ShapesDataset, collate
from unclip.embedding import TextCondition
from unclip.pipelines import UnCLIPPipeline
from unclip.prior import AutoregressivePrior
from unclip.prior.autoregressive import reconstruction_cosines

D, TOKEN_DIM, TEXT_LENGTH = 16, 8, 6
TINY = dict(width=32, depth=1, heads=2)


def _pairs(n: int = 400, rank: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image embeddings [n, D] near a rank-``rank`` subspace, and text embeddings that resemble them."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, rank, generator=g) @ torch.randn(rank, D, generator=g)
                         + 0.3 * torch.randn(n, D, generator=g), dim=-1)
    return images, F.normalize(images + 0.5 * torch.randn(n, D, generator=g), dim=-1)


def _text(embeds: torch.Tensor, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    n = len(embeds)
    return TextCondition(embed=embeds, tokens=torch.zeros(n, TEXT_LENGTH, dtype=torch.long),
                         token_embeds=torch.randn(n, TEXT_LENGTH, TOKEN_DIM, generator=g),
                         mask=torch.arange(TEXT_LENGTH) < torch.randint(2, TEXT_LENGTH + 1, (n, 1), generator=g))


def _prior(**settings) -> AutoregressivePrior:
    torch.manual_seed(0)
    return AutoregressivePrior(embed_dim=D, token_dim=TOKEN_DIM, text_length=TEXT_LENGTH, **{**TINY, **settings})


def test_pca_keeps_the_fewest_components_that_reach_the_target_cosine():
    images, texts = _pairs()
    prior = _prior(min_cosine=0.99)
    fit = prior.fit_normalisation(images, texts)
    kept = fit["pca_components"]
    assert 1 < kept < D and fit["pca_cosine"] >= 0.99 and int(prior.num_components) == kept
    cosines = reconstruction_cosines(images, prior.embed_mean, prior.basis)
    assert cosines[kept - 2] < 0.99 <= cosines[kept - 1]  # one fewer component misses the target
    # the cumulative formula is the reconstruction's cosine
    direct = F.cosine_similarity(prior.embed_mean + (images - prior.embed_mean) @ prior.basis[:, :kept]
                                 @ prior.basis[:, :kept].T, images).mean()
    torch.testing.assert_close(direct, torch.tensor(fit["pca_cosine"]), atol=1e-5, rtol=0)
    assert _prior(min_cosine=0.999).fit_normalisation(images, texts)["pca_components"] > kept
    fixed = _prior(components=3)
    assert fixed.fit_normalisation(images, texts)["pca_components"] == 3 and fixed.basis.shape == (D, 3)


def test_quantise_then_dequantise_stays_within_a_bucket_of_the_pca_reconstruction():
    images, texts = _pairs()
    prior = _prior(num_buckets=32)
    fit = prior.fit_normalisation(images, texts)
    kept = fit["pca_components"]
    ids = prior.quantise(images)
    assert ids.shape == (len(images), kept) and 0 <= ids.min() and ids.max() < 32
    counts = torch.stack([torch.bincount(column, minlength=32) for column in ids.T])
    assert counts.min() >= len(images) // 32 - 2  # equal mass: every bucket of every component in use
    coords = (images - prior.embed_mean) @ prior.basis[:, :kept]
    bounds = torch.cat([coords.min(0).values[:, None], prior.edges[:kept], coords.max(0).values[:, None]], dim=1)
    width = (bounds[:, 1:] - bounds[:, :-1]).gather(1, ids.T).T
    error = (coords - prior.centres[:kept].gather(1, ids.T).T).abs()
    assert (error <= width + 1e-6).all()  # each value decodes to a point of its own bucket
    assert fit["quantised_cosine"] > fit["pca_cosine"] - 0.01
    finer = _prior(num_buckets=256).fit_normalisation(images, texts)["quantised_cosine"]
    assert finer > fit["quantised_cosine"]


def test_training_loss_falls_and_samples_find_each_captions_embedding():
    torch.manual_seed(0)
    targets = F.normalize(torch.randn(4, D), dim=-1)  # a fixed image embedding per caption
    images = F.normalize(targets.repeat_interleave(16, 0) + 0.02 * torch.randn(64, D), dim=-1)
    # each caption's pairs span the whole range of image-text dot products (as real captions' do), so that the
    # upper half that sampling draws from is a condition every caption was trained with
    other = F.normalize(torch.randn(4, D), dim=-1)
    other = F.normalize(other - (other * targets).sum(-1, keepdim=True) * targets, dim=-1)
    angles = torch.linspace(0.3, 1.3, 16).repeat(4)[:, None]
    embeds = angles.cos() * targets.repeat_interleave(16, 0) + angles.sin() * other.repeat_interleave(16, 0)
    text = _text(embeds)
    text.token_embeds = text.token_embeds[::16].repeat_interleave(16, 0)  # one caption's tokens per target
    text.mask = text.mask[::16].repeat_interleave(16, 0)
    prior = _prior(num_buckets=16, cond_drop_prob=0.1)
    prior.fit_normalisation(images, text.embed)
    batch = {"image_embed": images, "text_embed": text.embed, "token_embeds": text.token_embeds, "mask": text.mask}
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = prior.training_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # equal-mass buckets split each caption's cluster over a few buckets: the floor is well above zero
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    prior.eval()
    predicted = prior.sample(text[::16], num_candidates=1, generator=torch.Generator().manual_seed(0))
    assert (predicted * targets).sum(-1).min() > 0.9


def test_sampling_is_seeded_and_returns_unit_norm_embeddings():
    images, texts = _pairs()
    prior = _prior().eval()
    prior.fit_normalisation(images, texts)
    text = _text(texts[:3])
    draws = [prior.sample(text, generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert draws[0].shape == (3, D) and torch.allclose(draws[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # the best of 8 candidates by dot product with the text embedding scores higher than single draws
    many = _text(texts[:32])
    one = prior.sample(many, num_candidates=1, generator=torch.Generator().manual_seed(2))
    eight = prior.sample(many, num_candidates=8, generator=torch.Generator().manual_seed(2))
    assert (eight * many.embed).sum(-1).mean() > (one * many.embed).sum(-1).mean() + 0.05
    # the diffusion prior's settings, as UnCLIPPipeline passes them, change nothing
    same = prior.sample(text, generator=torch.Generator().manual_seed(0), steps=8, eta=0.0, sampler="dpmpp_2m",
                        spacing="karras", cuda_graphs="auto")
    assert torch.equal(same, draws[0])
    greedy = [prior.sample(text, top_k=1, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    assert torch.equal(greedy[0], greedy[1])  # top_k=1: the most likely bucket, whatever the seed


def test_guidance_scale_one_is_the_conditional_model():
    images, texts = _pairs()
    prior = _prior().eval()
    prior.fit_normalisation(images, texts)
    for param in prior.parameters():  # a lively untrained model: the caption and its null differ
        param.data.add_(0.1 * torch.randn_like(param))
    text, negative = _text(texts[:3]), _text(texts[3:6], seed=1)
    prefix = prior._sampling_prefix(text, None, 1, True, torch.Generator().manual_seed(0))
    filters = dict(temperature=1.0, top_k=None, top_p=None)
    guided = prior._draw_ids(prefix, 1.0, filters, torch.Generator().manual_seed(0))  # the doubled batch at 1
    plain = prior._draw_ids(prefix[:3], None, filters, torch.Generator().manual_seed(0))
    assert torch.equal(guided, plain)
    unguided = prior.sample(text, generator=torch.Generator().manual_seed(0))
    with_negative = prior.sample(text, negative=negative, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unguided, with_negative)  # at scale 1 nothing is steered away from
    steered = prior.sample(text, guidance_scale=4.0, negative=negative, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(steered, unguided)


def test_unconditional_samples_come_from_the_learned_nulls_seeded_and_unit_norm():
    images, texts = _pairs()
    prior = _prior().eval()
    prior.fit_normalisation(images, texts)
    draws = [prior.sample_unconditional(4, generator=torch.Generator().manual_seed(seed), steps=8) for seed in (0, 0, 1)]
    assert draws[0].shape == (4, D) and torch.allclose(draws[0].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # the null rows of any caption's guided prefix: what the text is does not matter
    prefix = prior._sampling_prefix(_text(texts[:4]), None, 1, True, torch.Generator().manual_seed(0))[4:]
    ids = prior._draw_ids(prefix, None, dict(temperature=1.0, top_k=prior.top_k, top_p=prior.top_p),
                          torch.Generator().manual_seed(0))
    assert torch.equal(prior.dequantise(ids), draws[0])
    with pytest.raises(ValueError, match=r"trained without caption dropout \(cond_drop_prob=0\)"):
        _prior(cond_drop_prob=0.0).sample_unconditional(2)


def test_a_checkpoint_keeps_the_fitted_pca_and_buckets_and_samples_the_same(tmp_path):
    images, texts = _pairs()
    prior = _prior(num_buckets=64, dot_buckets=4, temperature=0.8, top_k=20).eval()
    prior.fit_normalisation(images, texts)
    path = save_stage(tmp_path / "prior", prior, stage="prior", space=None)
    loaded = load_stage(path, stage="prior").model.eval()
    assert isinstance(loaded, AutoregressivePrior) and loaded.config == prior.config
    for name, value in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    text = _text(texts[:2])
    assert torch.equal(loaded.sample(text, generator=torch.Generator().manual_seed(0)),
                       prior.sample(text, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("settings, message", [
    (dict(num_buckets=1), r"num_buckets must be an int >= 2 \(the buckets per PCA component\), got 1"),
    (dict(dot_buckets=1), r"dot_buckets must be an int >= 2 \(sampling draws from the upper half\), got 1"),
    (dict(min_cosine=0.0), r"min_cosine must be in \(0, 1\] .*got 0.0; or set components"),
    (dict(min_cosine=1.5), r"min_cosine must be in \(0, 1\] .*got 1.5"),
    (dict(components=17), r"components must be an int in \[1, 16\] \(the embedding's dimension\) or null, got 17"),
    (dict(cond_drop_prob=1.0), r"cond_drop_prob must be in \[0, 1\), got 1.0"),
    (dict(top_k=300), r"top_k must be an int in \[1, 256\]"),
    (dict(temperature=0), "temperature must be > 0, got 0"),
])
def test_bad_settings_are_errors_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        _prior(**settings)


def test_an_unfitted_prior_or_another_space_s_captions_are_errors():
    images, texts = _pairs()
    prior = _prior()
    with pytest.raises(RuntimeError, match=r"no fitted PCA yet: call fit_normalisation\(image_embeds, text_embeds\)"):
        prior.sample(_text(texts[:2]))
    with pytest.raises(ValueError, match="fits its dot-product buckets on image-text pairs"):
        prior.fit_normalisation(images)
    prior.fit_normalisation(images, texts)
    wide = TextCondition(embed=F.normalize(torch.randn(2, 32), dim=-1), tokens=torch.zeros(2, TEXT_LENGTH).long(),
                         token_embeds=torch.randn(2, TEXT_LENGTH, TOKEN_DIM), mask=torch.ones(2, TEXT_LENGTH).bool())
    with pytest.raises(ValueError, match=r"embeddings of dim 32 and token states of dim 8; this autoregressive prior "
                                         r"was trained in a space of 16 and 8: pair it with the CLIP"):
        prior.sample(wide)


def _micro_ar_prior(space) -> AutoregressivePrior:
    prior = AutoregressivePrior(embed_dim=space.dim, token_dim=space.token_dim, text_length=space.text_length,
                                num_buckets=8, **TINY)
    g = torch.Generator().manual_seed(0)
    embeds = F.normalize(torch.randn(64, space.dim, generator=g), dim=-1)
    prior.fit_normalisation(embeds, F.normalize(embeds + torch.randn(64, space.dim, generator=g), dim=-1))
    return prior


def test_the_pipeline_composes_with_it_and_refuses_it_from_another_clip(tmp_path):
    stages = save_micro_pipeline(tmp_path / "stages")
    space = load_stage(stages["clip"], stage="clip").space
    prior = save_stage(tmp_path / "ar", _micro_ar_prior(space), stage="prior", space=space)
    pipe = UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=prior, decoder=stages["decoder"], device="cpu")
    images = pipe.generate(["a red circle"], seed=0, output="tensor", decoder_steps=2, prior_steps=3,
                           prior_sampler="dpmpp_2m")
    assert images.shape == (1, 3, 16, 16)
    other_clip = micro_stages(seed=1)[0]
    other = save_stage(tmp_path / "other", _micro_ar_prior(other_clip.space), stage="prior", space=other_clip.space)
    with pytest.raises(ValueError, match=r"the CLIP was trained in embedding space micro \(dim 32, fingerprint \w+\) "
                                         r"but the prior in micro \(dim 32, fingerprint \w+\)"):
        UnCLIPPipeline.from_pretrained(clip=stages["clip"], prior=other, decoder=stages["decoder"])


# -- train/prior.py prior=autoregressive, killed with SIGKILL and resumed ---------------------------------------
STEPS = 12  # checkpoints every 4: killed after step 8, resumed for 4
JOB = ["train/prior.py", "prior=autoregressive", "prior.width=32", "prior.depth=1", "prior.heads=2",
       "prior.num_buckets=16", "prior.min_cosine=0.95", f"trainer.max_steps={STEPS}", "trainer.batch_size=8",
       "trainer.mixed_precision=no", "trainer.warmup_steps=2", "trainer.ema_update_after_step=2",
       "trainer.checkpoint_every=4", "trainer.progress=false", "eval_items=8", "sampling.num_candidates=1"]


@pytest.mark.slow
def test_the_prior_job_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    clip = micro_stages()[0].eval()
    for split, length in (("train", 64), ("val", 16)):
        write_embedding_shards(tmp_path / "embed" / split, clip, ShapesDataset(split=split, length=length,
                               image_size=32), collate_fn=collate, shard_size=64, batch_size=32, progress=False)
    embeddings = f"embeddings={tmp_path / 'embed'}"
    out = run_job(JOB, tmp_path / "straight", embeddings, timeout=600)
    metrics = json.loads(out.strip().splitlines()[-1])  # the last line is metrics.json
    assert {"pca_components", "pca_cosine", "quantised_cosine", "cosine_val"} <= set(metrics)
    assert metrics["pca_cosine"] >= 0.95 and metrics["step"] == STEPS

    kill_after_step(run_job(JOB, tmp_path / "killed", embeddings, wait=False), tmp_path / "killed", 8, STEPS, within=300)
    run_job(JOB, tmp_path / "killed", embeddings, "trainer.resume=true", timeout=600)
    final = f"checkpoints/step-{STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / final / name), load_file(tmp_path / "killed" / final / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}:{key}")
