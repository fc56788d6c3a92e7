import math

import pytest
import torch

from unclip.checkpoint import load_stage, save_stage
from unclip.data.shapes import ShapesDataset
from unclip.dvae import DiscreteVAE, gumbel_temperature, kl_weight


def tiny_dvae(**kwargs) -> DiscreteVAE:
    torch.manual_seed(0)
    settings = dict(image_size=16, grid_size=4, codebook_size=32, codebook_dim=8, channels=[16, 16],
                    temperature_steps=100, kl_weight_max=0.01, kl_steps=10)
    return DiscreteVAE(**{**settings, **kwargs})


def shapes_images(n: int, size: int = 16) -> torch.Tensor:
    data = ShapesDataset("train", length=n, image_size=size)
    return torch.stack([data[i]["image"] for i in range(n)])


def test_encode_gives_a_token_grid_and_decode_gives_images_in_range():
    dvae = tiny_dvae()
    images = shapes_images(3)
    tokens = dvae.encode(images)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    decoded = dvae.decode(tokens)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_the_loss_goes_down_on_a_tiny_batch_and_argmax_reconstructions_follow():
    dvae = tiny_dvae(straight_through=True)
    images = shapes_images(8)
    opt = torch.optim.Adam(dvae.parameters(), lr=3e-3)
    first = dvae.training_loss(images)["recon"].item()
    for _ in range(40):
        loss = dvae.training_loss(images)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        dvae.advance_schedule()
    last = dvae.training_loss(images)["recon"].item()
    argmax_error = ((dvae.decode(dvae.encode(images)) - images) ** 2).mean().item()
    assert last < 0.4 * first, (first, last)
    assert argmax_error < 0.4 * first, (first, argmax_error)


def test_schedules_at_chosen_steps():
    assert gumbel_temperature(0, start=1.0, end=1 / 16, steps=1000) == 1.0
    assert gumbel_temperature(500, start=1.0, end=1 / 16, steps=1000) == pytest.approx((1 + 1 / 16) / 2)
    assert gumbel_temperature(1000, start=1.0, end=1 / 16, steps=1000) == pytest.approx(1 / 16)
    assert gumbel_temperature(5000, start=1.0, end=1 / 16, steps=1000) == pytest.approx(1 / 16)
    quarter = 0.5 * (1 - math.cos(math.pi / 4))  # the half cosine a quarter of the way
    assert gumbel_temperature(250, start=1.0, end=0.0625, steps=1000) == pytest.approx(1 - quarter * (1 - 0.0625))
    assert kl_weight(0, maximum=6.6, steps=100) == 0.0
    assert kl_weight(25, maximum=6.6, steps=100) == pytest.approx(6.6 * quarter)
    assert kl_weight(50, maximum=6.6, steps=100) == pytest.approx(3.3)
    assert kl_weight(100, maximum=6.6, steps=100) == kl_weight(10**6, maximum=6.6, steps=100) == pytest.approx(6.6)
    with pytest.raises(ValueError, match="step must be >= 0"):
        gumbel_temperature(-1)


def test_the_loss_reads_its_schedule_from_the_step_buffer_or_the_given_step():
    dvae = tiny_dvae()
    images = shapes_images(2)
    out = dvae.training_loss(images)
    assert out["tau"].item() == 1.0 and out["kl_weight"].item() == 0.0
    for _ in range(50):
        dvae.advance_schedule()
    out = dvae.training_loss(images)
    assert out["tau"].item() == pytest.approx(gumbel_temperature(50, end=1 / 16, steps=100))
    assert out["kl_weight"].item() == pytest.approx(0.01)
    assert dvae.training_loss(images, step=100)["tau"].item() == pytest.approx(1 / 16)
    assert int(dvae.schedule_step) == 50


def test_the_schedule_step_travels_with_the_checkpoint(tmp_path):
    dvae = tiny_dvae()
    for _ in range(7):
        dvae.advance_schedule()
    save_stage(tmp_path / "dvae", dvae, stage="dvae", space=None)
    loaded = load_stage(tmp_path / "dvae", stage="dvae").model
    assert int(loaded.schedule_step) == 7
    images = shapes_images(2)
    assert torch.equal(loaded.encode(images), dvae.encode(images))


def test_the_loss_is_the_reconstruction_plus_the_weighted_kls_to_uniform():
    dvae = tiny_dvae(straight_through=True, kl_weight_max=0.5, kl_steps=0, usage_kl_weight=0.25)
    images = shapes_images(2)
    logits = dvae.logits(images)
    out = dvae.training_loss(images, gumbel=torch.zeros_like(logits))
    q = logits.softmax(dim=1)
    kl = (q * (q.log() + math.log(32))).sum(dim=1).mean()  # KL(q || uniform over 32), mean over cells
    usage = q.mean(dim=(0, 2, 3))
    usage_kl = (usage * (usage.log() + math.log(32))).sum()  # the batch's aggregate distribution vs uniform
    # straight-through with no noise: the forward pass decodes exactly the argmax tokens, as decode does
    argmax_images = dvae.decode_codes(dvae.codebook(logits.argmax(dim=1)).permute(0, 3, 1, 2))
    recon = ((argmax_images - images) ** 2).mean()
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert out["recon"].item() == pytest.approx(recon.item(), rel=1e-4)
    assert out["usage_kl"].item() == pytest.approx(usage_kl.item(), rel=1e-4, abs=1e-6)
    assert out["loss"].item() == pytest.approx(recon.item() + 0.5 * kl.item() + 0.25 * usage_kl.item(), rel=1e-4)


def test_bad_input_is_named():
    dvae = tiny_dvae()
    with pytest.raises(ValueError, match=r"\[B, 4, 4\].*got shape \(2, 8, 8\)"):
        dvae.decode(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\).*from 0 to 40"):
        dvae.decode(torch.tensor([[[0, 1, 2, 40]] * 4]))
    with pytest.raises(ValueError, match=r"\[0, 32\).*from -1 to 3"):
        dvae.decode(torch.tensor([[[-1, 1, 2, 3]] * 4]))
    with pytest.raises(ValueError, match="integer ids"):
        dvae.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*got shape \(1, 3, 32, 32\)"):
        dvae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="grid_size 8 does not fit image_size 16"):
        DiscreteVAE(image_size=16, grid_size=8, channels=[16, 16])
    with pytest.raises(ValueError, match="start >= end > 0"):
        DiscreteVAE(image_size=16, grid_size=4, channels=[16, 16], temperature_end=0)
