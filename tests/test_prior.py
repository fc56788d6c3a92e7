import json

import pytest
import torch
import torch.nn.functional as F
from stages import micro_stages

from unclip.checkpoint import load_stage, save_stage, write_manifest
from unclip.data.embeddings import EmbeddingShards, write_embedding_shards
from unclip.data.shapes import ShapesDataset, collate
from unclip.embedding import EmbeddingSpace
from unclip.prior import DiffusionPrior, PassthroughPrior
from unclip.weights import CheckpointError


def test_prior_learns_to_map_text_to_image_embeddings_and_beats_passthrough():
    torch.manual_seed(0)
    clip, prior, _, _ = micro_stages()
    text = clip.encode_text([f"a {c} circle" for c in ("red", "blue", "green", "pink")])
    cond = text.repeat_interleave(8)
    targets = F.normalize(torch.randn(4, 32), dim=-1).repeat_interleave(8, 0)  # a fixed image embedding per caption
    prior = DiffusionPrior(embed_dim=32, token_dim=32, text_length=16, net=dict(width=64, depth=2, heads=2),
                           num_steps=100, cond_drop_prob=0.1)
    prior.fit_normalisation(targets)
    batch = {"image_embed": targets, "text_embed": cond.embed.detach(), "token_embeds": cond.token_embeds.detach(), "mask": cond.mask}
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    for _ in range(100):  # cosine 0.999 from step 100 (seeds 0-2)
        loss = prior.training_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    predicted = prior.sample(text.to("cpu"), steps=20, generator=torch.Generator().manual_seed(0))
    truth = targets[::8]
    cosine = (predicted * truth).sum(-1)
    passthrough = (PassthroughPrior().sample(text) * truth).sum(-1)
    assert torch.allclose(predicted.norm(dim=-1), torch.ones(4), atol=1e-4)
    assert cosine.mean() > 0.9 > passthrough.mean(), (cosine, passthrough)


def test_prior_keeps_the_best_candidate_and_does_not_touch_inputs():
    clip, prior, _, _ = micro_stages()
    text = clip.encode_text(["a red circle", "a blue square"])
    before = text.embed.clone()
    one = prior.sample(text, steps=4, num_candidates=1, generator=torch.Generator().manual_seed(1))
    four = prior.sample(text, steps=4, num_candidates=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(text.embed, before)
    # the best of 4 (the first of which is the single draw) scores at least as high as one draw
    assert ((four * text.embed).sum(-1) >= (one * text.embed).sum(-1) - 1e-5).all()
    with pytest.raises(ValueError, match="zero prompts"):
        prior.sample(text[:0], steps=2)
    with pytest.raises(ValueError, match="zero prompts"):
        PassthroughPrior().sample(text[:0])


def test_prior_checkpoint_keeps_its_normalisation():
    _, prior, _, _ = micro_stages()
    prior.fit_normalisation(torch.randn(100, 32) * 3 + 1)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = save_stage(Path(tmp) / "prior", prior, stage="prior", space=None)
        loaded = load_stage(path, stage="prior").model
    torch.testing.assert_close(loaded.embed_mean, prior.embed_mean)
    torch.testing.assert_close(loaded.embed_std, prior.embed_std)
    with pytest.raises(ValueError, match=r"the diffusion prior fits .* on \[N >= 2, 32\] training image embeddings, "
                                         r"got \[1, 32\]"):  # one embedding's std is NaN
        prior.fit_normalisation(torch.randn(1, 32))


def test_embedding_shards_round_trip_and_refuse_other_spaces(tmp_path):
    clip, _, _, _ = micro_stages()
    dataset = ShapesDataset(split="val", length=20, image_size=32)
    paths = write_embedding_shards(tmp_path / "val", clip, dataset, collate_fn=collate, shard_size=8, batch_size=8, progress=False)
    assert len(paths) == 3
    shards = EmbeddingShards(tmp_path / "val", expected_space=clip.space)
    assert len(shards) == 20 and shards.space == clip.space
    item = shards[3]
    torch.testing.assert_close(item["image_embed"], clip.encode_image(dataset[3]["image"][None])[0], atol=2e-3, rtol=0)
    assert item["caption"] == dataset[3]["caption"] and item["meta"] == dataset[3]["meta"]
    other = EmbeddingSpace.from_dict({**clip.space.to_dict(), "fingerprint": "f" * 16, "name": "other"})
    with pytest.raises(ValueError, match="the CLIP named in the config was trained in embedding space other"):
        EmbeddingShards(tmp_path / "val", expected_space=other)
    with pytest.raises(CheckpointError, match="do not exist"):
        EmbeddingShards(tmp_path / "nope")
    # a shard whose tensors do not fit its space
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(paths[0]), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(paths[0])
    tensors["token_embeds"] = tensors["token_embeds"][:, :, :7].contiguous()
    save_file(tensors, str(paths[0]), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"token_embeds has shape \(8, 16, 7\), expected \(8, 16, 32\)"):
        EmbeddingShards(tmp_path / "val")


def test_the_prior_takes_its_transformer_settings_in_net_and_loads_a_checkpoint_saved_flat(tmp_path):
    _, prior, _, _ = micro_stages()
    assert prior.config["net"] == {"width": 32, "depth": 1, "heads": 2, "dropout": 0.0, "ff_mult": 4,
                                   "use_caption_tokens": True}  # every setting: a later default cannot change it
    path = save_stage(tmp_path / "prior", prior, stage="prior", space=None)
    saved = json.loads((path / "config.json").read_text())
    flat = {k: v for k, v in saved["model"].items() if k != "net"}
    saved["model"] = {**flat, "width": 32, "depth": 1, "heads": 2, "dropout": 0.0, "use_caption_tokens": True}
    (path / "config.json").write_text(json.dumps(saved))  # as a prior saved before net: existed
    write_manifest(path)  # its save wrote a manifest of that config.json
    loaded = load_stage(path, stage="prior").model
    assert loaded.config == prior.config
    for name, weight in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    with pytest.raises(ValueError, match=r"net.widht is not a setting of the prior's transformer; net takes width, "
                                         r"depth, heads, dropout, ff_mult, use_caption_tokens \(embed_dim, token_dim"):
        DiffusionPrior(embed_dim=32, token_dim=32, text_length=16, net={"widht": 64})
