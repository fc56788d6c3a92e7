import json

import pytest
import torch
from stages import TINY_UNET, micro_stages

from unclip.checkpoint import load_stage, save_stage, write_manifest
from unclip.decoder import Decoder, Upsampler
from unclip.eval.decoder import psnr
from unclip.images import resize


def test_decoder_trains_and_samples_in_range():
    torch.manual_seed(0)
    clip, _, decoder, _ = micro_stages()
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    embed = torch.nn.functional.normalize(torch.randn(4, 32), dim=-1)
    text = clip.encode_text(["a red circle"] * 4)
    # A fixed problem (timesteps, noise, no dropping), so the loss must fall, whatever the random draws.
    fixed = dict(t=torch.tensor([3, 15, 30, 45]), noise=torch.randn(4, 3, 16, 16),
                 drop_image_embed=torch.zeros(4, dtype=torch.bool), drop_caption=torch.zeros(4, dtype=torch.bool))
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = decoder.training_loss(images, embed, text, **fixed)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    samples = decoder.sample(embed, text, steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 3, 16, 16) and samples.min() >= -1 and samples.max() <= 1
    again = decoder.sample(embed, text, steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    ddpm = decoder.sample(embed, None, steps=5, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert ddpm.shape == samples.shape


def test_decoder_bad_inputs_name_what_was_expected():
    _, _, decoder, _ = micro_stages()
    with pytest.raises(ValueError, match=r"image_embed must be \[B, 32\].*got \(2, 31\)"):
        decoder.sample(torch.randn(2, 31), steps=2)
    with pytest.raises(ValueError, match="images must be 16x16"):
        decoder.training_loss(torch.zeros(2, 3, 32, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="divisible"):
        Decoder(image_size=18, image_embed_dim=32, text_length=16, unet={**TINY_UNET, "channel_mult": [1, 2, 2]})
    with pytest.raises(ValueError, match="caption must be one of"):
        Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="bert")


def test_upsampler_checks_its_input_trains_and_samples_at_the_output_size():
    torch.manual_seed(0)
    from unclip.data.shapes import ShapesDataset, collate

    up = Upsampler(low_res_size=16, image_size=32, unet=TINY_UNET, num_steps=100, max_aug_level=0.1)
    with pytest.raises(ValueError, match=r"low-resolution images \[B, 3, 16, 16\], got \(1, 3, 32, 32\)"):
        up.sample(torch.zeros(1, 3, 32, 32))
    data = collate([ShapesDataset(split="train", length=16, image_size=32)[i] for i in range(16)])["image"]
    opt = torch.optim.Adam(up.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):  # the last 5 losses are 0.27-0.33 of the first 5 at step 15 (seeds 0-2)
        loss = up.training_loss(data)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    low = resize(data[:8], 16)
    samples = up.sample(low, steps=10, aug_level=0.0, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (8, 3, 32, 32) and samples.min() >= -1 and samples.max() <= 1
    assert psnr(samples, samples) > 90 and psnr(-data[:8], data[:8]) < psnr(resize(low, 32), data[:8])
    with pytest.raises(ValueError, match=r"aug_level must be in \[0, max_aug_level=0.1\]"):
        up.sample(low, aug_level=0.5)


def test_saved_configs_record_the_upsampling_width():
    """A saved decoder or upsampler rebuilds with the same upsampling width whatever the default becomes."""
    decoder = Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none", unet=TINY_UNET)
    assert decoder.config["unet"]["upsample_width"] == "next"
    same = Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none",
                   unet={**TINY_UNET, "upsample_width": "same"})
    assert same.config["unet"]["upsample_width"] == "same"
    up = Upsampler(low_res_size=16, image_size=32, unet=TINY_UNET)
    assert up.config["unet"]["upsample_width"] == "next"


def test_a_decoder_saves_its_min_snr_floor_and_trains_with_it(tmp_path):
    """decoder.min_snr_floor reaches the diffusion's loss weights and comes back from a checkpoint."""
    decoder = Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none", unet=TINY_UNET,
                      objective="v", loss_weighting="min_snr", min_snr_floor=0.5)
    t = torch.tensor([decoder.diffusion.num_steps - 1])
    assert decoder.diffusion.loss_weight(t).item() > 0.45  # plain min-SNR: ~0 at the last step
    loaded = load_stage(save_stage(tmp_path / "decoder", decoder, stage="decoder", space=None), stage="decoder").model
    assert loaded.diffusion.min_snr_floor == 0.5 and loaded.config == decoder.config
    with pytest.raises(ValueError, match="min_snr_floor=0.5 floors the min_snr weighting, but loss_weighting is 'none'"):
        Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none", unet=TINY_UNET,
                loss_weighting="none", min_snr_floor=0.5)


def test_the_image_embedding_settings_stand_beside_unet_and_a_checkpoint_saved_with_them_inside_loads(tmp_path):
    decoder = Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none", unet=TINY_UNET,
                      num_image_tokens=2)
    assert decoder.unet.conditions["image"].num_tokens == 2 and "num_image_tokens" not in decoder.config["unet"]
    path = save_stage(tmp_path / "decoder", decoder, stage="decoder", space=None)
    saved = json.loads((path / "config.json").read_text())
    saved["model"]["unet"]["num_image_tokens"] = saved["model"].pop("num_image_tokens")
    (path / "config.json").write_text(json.dumps(saved))  # as a decoder saved when it stood in unet:
    write_manifest(path)  # its save wrote a manifest of that config.json
    loaded = load_stage(path, stage="decoder").model
    assert loaded.config == decoder.config
    with pytest.raises(ValueError, match=r"unet: no longer takes num_image_tokens: the image-embedding conditioning's "
                                         r"settings stand beside unet: in the decoder's config \(e.g. "
                                         r"decoder.num_image_tokens=...\)"):
        Decoder(image_size=16, image_embed_dim=32, text_length=16, unet={**TINY_UNET, "num_image_tokens": 2})


def test_a_decoder_reading_its_embedding_standardised_on_a_grid_keeps_the_fit_in_its_checkpoint(tmp_path):
    """The shapes experiment's decoder (decoder.standardise_embed, decoder.spatial_embed_grid): the training embeddings'
    statistics travel in the checkpoint, so the loaded decoder samples what the trained one did."""
    torch.manual_seed(0)
    decoder = Decoder(image_size=16, image_embed_dim=32, text_length=16, caption="none", unet=TINY_UNET,
                      spatial_embed_grid=4, standardise_embed=True)
    embeds = torch.nn.functional.normalize(torch.randn(64, 32) * 0.1 + 1.0, dim=-1)
    decoder.fit_normalisation(embeds)
    condition = decoder.unet.conditions["image"]
    assert torch.allclose(condition.embed_mean, embeds.mean(0)) and torch.allclose(condition.embed_std, embeds.std(0))
    loaded = load_stage(save_stage(tmp_path / "decoder", decoder, stage="decoder", space=None), stage="decoder").model
    assert torch.equal(loaded.unet.conditions["image"].embed_std, condition.embed_std)
    sample = lambda model: model.sample(embeds[:2], steps=2, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(sample(loaded), sample(decoder))
    with pytest.raises(ValueError, match=r"standardise_embed fits .* on \[N >= 2, 32\] training image embeddings, "
                                         r"got \[1, 32\]"):
        decoder.fit_normalisation(embeds[:1])
