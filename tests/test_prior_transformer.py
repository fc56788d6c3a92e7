"""The diffusion prior's network: shapes, causal structure, masking, guidance dropping, training."""

import pytest
import torch

from unclip.prior import PriorTransformer

D, DT, T = 16, 12, 7



def make_prior(**overrides) -> PriorTransformer:
    torch.manual_seed(0)
    config = dict(embed_dim=D, token_dim=DT, text_length=T, width=32, depth=2, heads=4)
    return PriorTransformer(**(config | overrides)).eval()


def make_inputs(batch: int = 4, tokens: int = T, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    for row in range(batch):  # ragged caption lengths: row i has tokens - i real tokens (at least 1)
        mask[row, max(1, tokens - row):] = False
    return dict(
        noised_image_embed=torch.randn(batch, D, generator=generator),
        t=torch.randint(0, 1000, (batch,), generator=generator),
        text_embed=torch.nn.functional.normalize(torch.randn(batch, D, generator=generator), dim=-1),
        token_embeds=torch.randn(batch, tokens, DT, generator=generator),
        mask=mask,
    )


def test_output_shape_and_final_query_readout():
    prior = make_prior()
    inputs = make_inputs(batch=3)
    out = prior(**inputs)
    assert out.shape == (3, D) and out.dtype == torch.float32
    # the last-block shortcut (only the query is computed there) matches the full sequence readout
    hidden = prior.hidden_states(**inputs)
    assert hidden.shape == (3, T + 4, 32)
    torch.testing.assert_close(out, prior.to_out(prior.norm_out(hidden[:, -1])))
    assert make_prior(use_caption_tokens=False)(**inputs).shape == (3, D)
    assert prior(inputs["noised_image_embed"], inputs["t"], inputs["text_embed"]).shape == (3, D)


def test_causal_structure():
    prior = make_prior()
    inputs = make_inputs()
    changed = dict(inputs, noised_image_embed=inputs["noised_image_embed"] + 1.0)
    before, after = prior.hidden_states(**inputs), prior.hidden_states(**changed)
    # caption tokens, text embedding and timestep come before the image: they cannot see it
    torch.testing.assert_close(before[:, :-2], after[:, :-2])
    assert not torch.allclose(before[:, -1], after[:, -1])  # the query sees it
    # a new timestep changes its own position onwards, never the caption or the text embedding
    changed_t = dict(inputs, t=inputs["t"] + 100)
    moved = prior.hidden_states(**changed_t)
    torch.testing.assert_close(before[:, :-3], moved[:, :-3])
    assert not torch.allclose(before[:, -3], moved[:, -3])


def test_padding_tokens_do_not_affect_output():
    prior = make_prior()
    inputs = make_inputs()
    out = prior(**inputs)
    garbage = inputs["token_embeds"].clone()
    garbage[~inputs["mask"]] = float("nan")  # even non-finite values in padding are harmless
    torch.testing.assert_close(prior(**dict(inputs, token_embeds=garbage)), out)
    # a shorter T (only the real tokens of the longest caption) gives the same answer
    row = inputs["mask"].sum(1).argmin()
    length = int(inputs["mask"][row].sum())
    short = prior(
        inputs["noised_image_embed"][row : row + 1], inputs["t"][row : row + 1], inputs["text_embed"][row : row + 1],
        inputs["token_embeds"][row : row + 1, :length], None,
    )
    torch.testing.assert_close(short, out[row : row + 1])
    # a caption of only padding (next to real ones, or alone) is finite: no fully masked attention row
    for mask in (inputs["mask"] & (torch.arange(4) > 0)[:, None], torch.zeros_like(inputs["mask"])):
        assert torch.isfinite(prior.hidden_states(**dict(inputs, mask=mask))).all()
        assert torch.isfinite(prior(**dict(inputs, mask=mask))).all()
        # some SDPA kernels (e.g. CUDA's) give NaN for a fully masked query row: the mask never has one
        _, attn_mask = prior._embed(**dict(inputs, mask=mask, drop_text=None))
        assert attn_mask is None or attn_mask.any(dim=-1).all()


def test_drop_text_rows_ignore_text_but_not_image_or_time():
    prior = make_prior()
    inputs = make_inputs()
    drop = torch.tensor([False, True, False, True])
    out = prior(**inputs, drop_text=drop)
    other_text = dict(
        inputs,
        text_embed=torch.randn_like(inputs["text_embed"]),
        token_embeds=torch.randn_like(inputs["token_embeds"]),
        mask=torch.ones_like(inputs["mask"]),
    )
    changed = prior(**other_text, drop_text=drop)
    torch.testing.assert_close(changed[drop], out[drop])
    assert not torch.allclose(changed[~drop], out[~drop])
    # the null condition differs from the real one, and dropped rows still follow image and t
    assert not torch.allclose(prior(**inputs)[drop], out[drop])
    image_moved = prior(**dict(inputs, noised_image_embed=inputs["noised_image_embed"] * 2), drop_text=drop)
    t_moved = prior(**dict(inputs, t=inputs["t"] + 100), drop_text=drop)
    for moved in (image_moved, t_moved):
        assert (moved[drop] - out[drop]).abs().amax(dim=-1).gt(1e-4).all()


def test_rows_are_independent_and_guidance_is_one_batched_call():
    prior = make_prior()
    inputs = make_inputs(batch=4)
    batched = prior(**inputs, drop_text=torch.tensor([False, True, False, False]))
    for row in (0, 2, 3):
        alone = prior(**{name: value[row : row + 1] for name, value in inputs.items()})
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-4)
    # classifier-free guidance: the batch doubled with drop flags = a conditional and an unconditional call
    doubled = {name: torch.cat([value, value]) for name, value in inputs.items()}
    flags = torch.tensor([False] * 4 + [True] * 4)
    cond, uncond = prior(**doubled, drop_text=flags).chunk(2)
    torch.testing.assert_close(cond, prior(**inputs), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(uncond, prior(**inputs, drop_text=torch.ones(4, dtype=torch.bool)), atol=1e-5, rtol=1e-4)


def test_inputs_are_not_modified():
    prior = make_prior().train()
    inputs = make_inputs()
    inputs["noised_image_embed"].requires_grad_(True)
    drop = torch.tensor([True, False, False, False])
    copies = {name: value.detach().clone() for name, value in inputs.items()}
    prior(**inputs, drop_text=drop).square().sum().backward()
    for name, value in inputs.items():
        assert torch.equal(value.detach(), copies[name]), name
    assert torch.equal(drop, torch.tensor([True, False, False, False]))


def test_bf16_autocast_is_finite_and_close_to_fp32():
    prior = make_prior().train()
    inputs = make_inputs()
    drop = torch.tensor([False, True, False, False])
    reference = prior(**inputs, drop_text=drop)
    with torch.autocast(inputs["t"].device.type, dtype=torch.bfloat16):
        out = prior(**inputs, drop_text=drop)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)
    out.float().square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in prior.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(noised_image_embed=torch.zeros(4, D + 1)), r"noised_image_embed has shape \[4, 17\]; expected \[B, 16\]"),
        (dict(text_embed=torch.zeros(4, D - 1)), r"text_embed has shape \[4, 15\]; expected \[4, 16\]"),
        (dict(text_embed=torch.zeros(3, D)), r"text_embed has shape \[3, 16\]; expected \[4, 16\]"),
        (dict(t=torch.zeros(3, dtype=torch.long)), r"t has shape \[3\]; expected \[4\]"),
        (dict(token_embeds=torch.zeros(4, T, DT + 1)), r"token_embeds has shape \[4, 7, 13\]; expected \[4, T, 12\]"),
        (dict(token_embeds=torch.zeros(4, T + 1, DT), mask=None), r"8 tokens .*text_length=7"),
        (dict(mask=torch.ones(4, T - 1, dtype=torch.bool)), r"mask has shape \[4, 6\].*expected \[4, 7\] bool"),
        (dict(mask=torch.ones(4, T)), r"mask has shape .*float32.*bool"),
        (dict(drop_text=torch.zeros(4)), r"drop_text .* expected \[4\] bool"),
        (dict(noised_image_embed=torch.zeros(0, D), text_embed=torch.zeros(0, D), t=torch.zeros(0)), r"empty batch"),
        (dict(token_embeds=None), r"mask was given without token_embeds"),
    ],
)
def test_bad_inputs_name_the_shape(change, message):
    with pytest.raises(ValueError, match=message):
        make_prior()(**(make_inputs() | change))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="width=30 must be divisible by heads=4"):
        make_prior(width=30)
    with pytest.raises(ValueError, match="depth=0"):
        make_prior(depth=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        make_prior(dropout=1.5)


def test_learns_to_map_text_embeddings_to_targets():
    prior = make_prior().train()
    inputs = make_inputs(batch=6)
    targets = torch.randn(6, D, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        t = torch.randint(0, 1000, (6,))
        noised = 0.5 * targets + torch.randn_like(targets)  # noise hides most of the target: the text must carry it
        predicted = prior(noised, t, inputs["text_embed"], inputs["token_embeds"], inputs["mask"])
        loss = (predicted - targets).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 10, (losses[:3], losses[-3:])


@pytest.mark.parametrize("padded", [False, True])
def test_cached_prefix_gives_the_full_forward(padded):
    """Sampling encodes [caption tokens | text embed] once: every step must equal the full forward."""
    prior = make_prior().eval()
    inputs = make_inputs(batch=6)
    if not padded:
        inputs["mask"] = None
    drop = torch.tensor([False, True, False, True, False, False])
    with torch.no_grad():
        cache = prior.encode_prefix(inputs["text_embed"], inputs["token_embeds"], inputs["mask"], drop_text=drop)
        for step in range(3):  # the same cache, new timesteps and noised embeddings
            x = torch.randn(6, D, generator=torch.Generator().manual_seed(step))
            t = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(10 + step))
            full = prior(x, t, inputs["text_embed"], inputs["token_embeds"], inputs["mask"], drop_text=drop)
            cached = prior.forward_with_prefix(x, t, cache)
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
