"""The decoder's UNet and caption encoders: shapes, conditioning paths, guidance nulls, masks, errors."""

import pytest
import torch

from unclip.decoder import CaptionEncoder, ClipTokenProjection, UNet
from unclip.decoder.conditioning import CaptionCondition, ImageEmbedCondition, LowResCondition
from unclip.decoder.unet import AttentionBlock, embedding_width

B, SIZE, EMBED, CTX, T = 4, 16, 12, 32, 6



def tiny_unet(**overrides) -> UNet:
    config = dict(image_size=SIZE, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), head_channels=16, image_embed_dim=EMBED, num_image_tokens=2,
                  context_dim=CTX)
    config.update(overrides)
    return composed_unet(**config)


def composed_unet(image_embed_dim=None, num_image_tokens=4, context_dim=None, low_res_channels=0,
                  aug_level_conditioning=False, **body) -> UNet:
    """The UNet body given the decoder's parts (image embedding, caption) or the upsampler's (low-res image)."""
    emb_dim = embedding_width(body.get("base_channels", 64))
    conditions = {}
    if context_dim:
        conditions["caption"] = CaptionCondition(context_dim, emb_dim)
    if image_embed_dim:
        conditions["image"] = ImageEmbedCondition(image_embed_dim, emb_dim, context_dim or emb_dim, num_image_tokens)
    if low_res_channels or aug_level_conditioning:
        conditions["low_res"] = LowResCondition(low_res_channels, emb_dim, body.get("base_channels", 64))
    return UNet(conditions=conditions, **body)


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised weights (output convs, norm biases) small random values, as after training:
    with them at zero no gradient reaches the rest of the network and no condition changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def inputs(seed: int = 0, batch: int = B) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[:, 4:] = False  # the last two tokens are padding
    mask[0, 2:] = False
    return dict(
        x=torch.randn(batch, 3, SIZE, SIZE, generator=gen),
        t=torch.randint(0, 1000, (batch,), generator=gen),
        image_embed=torch.nn.functional.normalize(torch.randn(batch, EMBED, generator=gen), dim=-1),
        context=torch.randn(batch, T, CTX, generator=gen),
        context_mask=mask,
        pooled_context=torch.randn(batch, CTX, generator=gen),
    )


def run(model, kw, **changes):
    kw = {**kw, **changes}
    return model(kw.pop("x"), kw.pop("t"), **kw)


@pytest.fixture
def trained_like():
    torch.manual_seed(0)
    model = tiny_unet().eval()
    randomize_zero_init(model)
    return model


def test_output_shape_equals_input_and_fresh_model_predicts_exactly_zero():
    torch.manual_seed(0)
    model = tiny_unet(out_channels=3)
    out = run(model, inputs())
    assert out.shape == (B, 3, SIZE, SIZE)
    # The final conv (and every residual branch's output conv) is zero-initialised.
    assert torch.equal(out, torch.zeros_like(out))
    # A scalar timestep applies to every row; fractional timesteps are accepted (continuous-time samplers).
    kw = inputs()
    randomize_zero_init(model)
    assert torch.equal(run(model, kw, t=torch.tensor(7)), run(model, kw, t=torch.full((B,), 7)))
    assert torch.isfinite(run(model, kw, t=torch.rand(B) * 999)).all()
    learned_sigma = tiny_unet(out_channels=6)  # e.g. eps + learned variance
    assert run(learned_sigma, inputs()).shape == (B, 6, SIZE, SIZE)


def test_three_levels_and_attention_at_listed_resolutions_only():
    model = tiny_unet(image_size=32, channel_mult=(1, 1, 2), attention_resolutions=(16, 4))  # 4 never occurs
    kw = inputs()
    kw["x"] = torch.randn(B, 3, 32, 32)
    seen = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    assert run(model, kw).shape == (B, 3, 32, 32)
    # down path: 1 block at 16; middle at 8; up path: 2 blocks at 16
    assert sorted(seen) == [8, 16, 16, 16]


@pytest.mark.parametrize("width, expected", [("next", [64, 32]), ("same", [128, 64])])
def test_upsampling_outputs_the_finer_levels_width_unless_same(width, expected):
    """The default narrows in the upsampling conv (level 2 -> 1 -> 0: 128 -> 64 -> 32 channels); ADM's
    "same" keeps the coarse width and narrows in the next residual block. Both run end to end."""
    model = tiny_unet(image_size=32, channel_mult=(1, 2, 4), upsample_width=width)
    ups = [level.resample.conv.out_channels for level in model.up if level.resample is not None]
    assert ups == expected
    kw = inputs()
    kw["x"] = torch.randn(B, 3, 32, 32)
    assert run(model, kw).shape == (B, 3, 32, 32)


def test_gradients_reach_every_parameter(trained_like):
    model = trained_like.train()
    kw = inputs()
    out = run(model, kw, drop_image_embed=torch.tensor([False, True, False, False]),
              drop_context=torch.tensor([False, False, True, False]))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert sum(1 for n, _ in model.named_parameters() if n.endswith("context_kv.weight")) == 4


def test_every_attention_layer_attends_to_caption_and_image_tokens(trained_like):
    model = trained_like
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
             for m in model.modules() if isinstance(m, AttentionBlock)]
    kw = inputs()
    run(model, kw)
    for h in hooks:
        h.remove()
    assert len(calls) == 4  # at 8 px: 1 in the down path, the middle, 2 in the up path
    for layer, (x, context, key_mask), out in calls:
        assert context.shape == (B, T + 2, CTX)  # caption tokens ++ 2 image tokens
        assert torch.allclose(layer(x, context, key_mask), out)
        caption_changed = context.clone()
        caption_changed[:, 0] += 1.0  # token 0 is real in every row
        image_changed = context.clone()
        image_changed[:, T:] += 1.0
        for changed in (caption_changed, image_changed):
            diff = (layer(x, changed, key_mask) - out).abs().flatten(1).amax(1)
            assert (diff > 1e-4).all(), f"{layer} ignores its context"


def test_drop_flags_change_only_dropped_rows_and_remove_their_conditioning(trained_like):
    model, kw = trained_like, inputs()
    base = run(model, kw)
    drop = torch.tensor([False, True, False, True])
    other = inputs(seed=1)

    for flag, keys in [("drop_image_embed", ["image_embed"]),
                       ("drop_context", ["context", "pooled_context", "context_mask"])]:
        dropped = run(model, kw, **{flag: drop})
        assert torch.allclose(dropped[~drop], base[~drop], atol=1e-5)
        assert ((dropped[drop] - base[drop]).abs().flatten(1).amax(1) > 1e-3).all()
        # Dropped rows no longer depend on the dropped conditioning.
        swapped = run(model, kw, **{flag: drop}, **{k: other[k] for k in keys})
        assert torch.allclose(swapped[drop], dropped[drop], atol=1e-5)

    # Dropping everything for every row is the unconditional model: same as passing no conditioning.
    everything = torch.ones(B, dtype=torch.bool)
    all_dropped = run(model, kw, drop_image_embed=everything, drop_context=everything)
    unconditional = model(kw["x"], kw["t"])
    assert torch.allclose(all_dropped, unconditional, atol=1e-5)


def test_guidance_is_one_batched_forward(trained_like):
    model, kw = trained_like, inputs()
    doubled = {k: torch.cat([v, v]) for k, v in kw.items()}
    flags = torch.tensor([False] * B + [True] * B)
    out = run(model, doubled, drop_image_embed=flags, drop_context=flags)
    assert torch.allclose(out[:B], run(model, kw), atol=1e-5)
    assert torch.allclose(out[B:], model(kw["x"], kw["t"]), atol=1e-5)


def test_context_mask_hides_padding_tokens(trained_like):
    model, kw = trained_like, inputs()
    base = run(model, kw)
    context = kw["context"].clone()
    context[~kw["context_mask"]] = 100.0 * torch.randn(int((~kw["context_mask"]).sum()), CTX)
    assert torch.allclose(run(model, kw, context=context), base, atol=1e-5)
    context = kw["context"].clone()
    context[0, 1] += 1.0  # a real token of row 0
    changed = (run(model, kw, context=context) - base).abs().flatten(1).amax(1)
    assert changed[0] > 1e-4 and torch.all(changed[1:] < 1e-5)


def test_upsampler_mode_uses_low_res_and_aug_level():
    torch.manual_seed(0)
    model = tiny_unet(image_embed_dim=None, context_dim=None, low_res_channels=3, aug_level_conditioning=True,
                      attention_resolutions=())
    randomize_zero_init(model)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 500])
    low_res, aug = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0.0, 0.3])
    out = model(x, t, low_res=low_res, aug_level=aug)
    assert out.shape == (2, 3, SIZE, SIZE)
    assert not torch.allclose(model(x, t, low_res=low_res.flip(0), aug_level=aug), out)
    assert not torch.allclose(model(x, t, low_res=low_res, aug_level=aug + 0.5), out)


def test_image_tokens_without_caption_encoder():
    torch.manual_seed(0)
    model = tiny_unet(context_dim=None)
    randomize_zero_init(model)
    kw = inputs()
    out = model(kw["x"], kw["t"], image_embed=kw["image_embed"])
    assert out.shape == kw["x"].shape
    assert model.context_width == 4 * 32  # image tokens use the time-embedding width
    assert not torch.allclose(model(kw["x"], kw["t"], image_embed=kw["image_embed"].flip(0)), out)
    with pytest.raises(ValueError, match=r"context given .*\(a Decoder with caption: transformer or clip_tokens "
                                         r"reads it, not one with caption: none"):
        model(kw["x"], kw["t"], image_embed=kw["image_embed"], context=torch.randn(B, T, CTX))
    with pytest.raises(ValueError, match=r"mask given .*\(a Decoder with inpaint: true \(conf/decoder/inpaint.yaml\)"):
        model(kw["x"], kw["t"], image_embed=kw["image_embed"], mask=torch.ones(B, 1, SIZE, SIZE))


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=18, channel_mult=(1, 2, 2)), r"image_size=18 must be divisible by .*=4"),
    (dict(base_channels=48), r"base_channels=48 must be a multiple of 32"),
    (dict(channel_mult=()), r"channel_mult"),
    (dict(dropout=1.0), r"dropout"),
    (dict(upsample_width="wide"), r"upsample_width must be one of \('next', 'same'\), got 'wide'"),
])
def test_bad_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_unet(**overrides)


@pytest.mark.parametrize("changes, message", [
    (dict(x=torch.randn(B, 3, 8, 8)), r"x has shape \[4, 3, 8, 8\], expected \[\*, 3, 16, 16\]"),
    (dict(x=torch.randn(B, 4, SIZE, SIZE)), r"x has shape \[4, 4, 16, 16\], expected \[\*, 3, 16, 16\]"),
    (dict(image_embed=torch.randn(B, 7)), r"image_embed has shape \[4, 7\], expected \[4, 12\]"),
    (dict(context=torch.randn(B, T, 5)), r"context has shape \[4, 6, 5\], expected \[4, \*, 32\]"),
    (dict(context_mask=torch.ones(B, T + 1, dtype=torch.bool)), r"context_mask has shape \[4, 7\]"),
    (dict(pooled_context=torch.randn(B, 5)), r"pooled_context has shape \[4, 5\], expected \[4, 32\]"),
    (dict(drop_context=torch.zeros(B)), r"drop_context must be a bool tensor"),
    (dict(low_res=torch.randn(B, 3, SIZE, SIZE)), r"low_res given .*\(an Upsampler \(conf/upsampler\) reads it"),
])
def test_bad_input_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_unet(), inputs(), **changes)


def test_upsampler_bad_low_res_errors():
    model = tiny_unet(image_embed_dim=None, context_dim=None, low_res_channels=3, aug_level_conditioning=True)
    x, t, aug = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 2]), torch.zeros(2)
    with pytest.raises(ValueError, match=r"low_res has shape \[2, 3, 8, 8\], expected \[2, 3, 16, 16\]"):
        model(x, t, low_res=torch.randn(2, 3, 8, 8), aug_level=aug)
    with pytest.raises(ValueError, match=r"low_res has shape \[2, 1, 16, 16\], expected \[2, 3, 16, 16\]"):
        model(x, t, low_res=torch.randn(2, 1, SIZE, SIZE), aug_level=aug)
    with pytest.raises(ValueError, match=r"low_res \[B, 3, 16, 16\] is required"):
        model(x, t, aug_level=aug)
    with pytest.raises(ValueError, match=r"aug_level \[B\] in \[0, 1\] is required"):
        model(x, t, low_res=torch.randn(2, 3, SIZE, SIZE))


def test_bf16_autocast_and_channels_last(trained_like):
    model, kw = trained_like, inputs()
    reference = run(model, kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model.train(), kw)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 1e-2
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval().to(memory_format=torch.channels_last)
    out = run(model, kw, x=kw["x"].to(memory_format=torch.channels_last))
    assert torch.allclose(out, reference, atol=1e-4)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny_unet()
    kw = inputs(batch=2)
    target = torch.randn_like(kw["x"])  # e.g. the noise to predict
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = (run(model, kw) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# ---------------------------------------------------------------- caption encoders


def caption_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 100, (3, 8), generator=gen)
    lengths = torch.tensor([8, 3, 5])
    mask = torch.arange(8)[None] < lengths[:, None]
    return tokens, mask, lengths


def test_caption_encoder_shapes_pooling_and_padding():
    torch.manual_seed(0)
    encoder = CaptionEncoder(vocab_size=100, context_length=8, width=32, layers=2, heads=4).eval()
    tokens, mask, lengths = caption_batch()
    states, pooled = encoder(tokens, mask)
    assert states.shape == (3, 8, 32) and pooled.shape == (3, 32)
    assert torch.equal(pooled, states[torch.arange(3), lengths - 1])
    # Padding tokens do not influence the real tokens' states.
    other = tokens.clone()
    other[~mask] = (other[~mask] + 1) % 100
    states2, pooled2 = encoder(other, mask)
    assert torch.allclose(states2[mask], states[mask], atol=1e-5)
    assert torch.allclose(pooled2, pooled, atol=1e-5)
    # Final LayerNorm: every state is normalised (unit variance, zero mean before the affine, which starts at 1/0).
    assert torch.allclose(states.mean(-1), torch.zeros(3, 8), atol=1e-4)
    # An empty caption is finite, not NaN.
    states, pooled = encoder(tokens, torch.zeros_like(mask))
    assert torch.isfinite(states).all() and torch.isfinite(pooled).all()


def test_caption_encoder_errors():
    encoder = CaptionEncoder(vocab_size=100, context_length=8, width=32, layers=1, heads=4)
    tokens, mask, _ = caption_batch()
    with pytest.raises(ValueError, match=r"tokens has length 9, expected at most context_length=8"):
        encoder(torch.zeros(3, 9, dtype=torch.long), torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \[3, 7\], expected \[3, 8\]"):
        encoder(tokens, mask[:, :7])
    with pytest.raises(ValueError, match=r"width=30 must be divisible by heads=4"):
        CaptionEncoder(width=30, heads=4)


def test_clip_token_projection_and_unet_end_to_end():
    torch.manual_seed(0)
    projection = ClipTokenProjection(token_dim=20, width=CTX)
    token_embeds = torch.randn(B, T, 20)
    kw = inputs()
    states, pooled = projection(token_embeds, kw["context_mask"])
    assert states.shape == (B, T, CTX) and pooled.shape == (B, CTX)
    assert torch.equal(pooled[0], states[0, 1]) and torch.equal(pooled[1], states[1, 3])
    with pytest.raises(ValueError, match=r"token_embeds has width 19, expected token_dim=20"):
        projection(torch.randn(B, T, 19), kw["context_mask"])
    # The caption states feed the UNet and gradients reach the projection.
    model = tiny_unet()
    randomize_zero_init(model)
    out = run(model, kw, context=states, pooled_context=pooled)
    out.square().mean().backward()
    assert projection.proj.weight.grad.abs().sum() > 0


def test_bf16_caption_encoder():
    encoder = CaptionEncoder(vocab_size=100, context_length=8, width=32, layers=2, heads=4)
    tokens, mask, _ = caption_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, pooled = encoder(tokens, mask)
    assert torch.isfinite(states.float()).all() and pooled.shape == (3, 32)


# ---------------------------------------------------------------- composed conditioning


def test_weights_of_the_uncomposed_unet_load_into_the_same_model(trained_like):
    """Checkpoints written before the conditioning became parts kept its weights on the UNet itself."""
    from unclip.decoder.unet import _OLD_NAMES

    old_state = {}
    for key, value in trained_like.state_dict().items():
        for old, new in _OLD_NAMES.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        old_state[key] = value
    assert "null_image_embed" in old_state and "pooled_to_time.weight" in old_state
    fresh = tiny_unet().eval()
    fresh.load_state_dict(old_state)
    kw = inputs()
    assert torch.equal(run(fresh, kw), run(trained_like, kw))


def test_an_input_no_part_reads_names_the_missing_part():
    upsampler = tiny_unet(image_embed_dim=None, context_dim=None, low_res_channels=3, aug_level_conditioning=True)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"image_embed given but this UNet was built without it \(a Decoder "
                                         r"\(conf/decoder\) reads it"):
        upsampler(x, t, low_res=torch.randn(2, 3, SIZE, SIZE), aug_level=torch.zeros(2), image_embed=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"different widths \[16, 32\]"):
        UNet(image_size=SIZE, base_channels=32, channel_mult=(1, 2), conditions={
            "caption": CaptionCondition(16, 128), "image": ImageEmbedCondition(EMBED, 128, 32)})
