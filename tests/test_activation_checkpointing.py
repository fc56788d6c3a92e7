"""trainer.activation_checkpointing: the same loss and gradients as without it, the checkpointed layers' activations
recomputed in the backward (their forward runs twice), only while training; the setting reaches the model from the
trainer; a model with nothing to checkpoint is an error before training."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, MICRO_CLIP
from dalle_stages import TINY_DVAE
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file
from stages import TINY_UNET, enliven

from unclip import activation_checkpointing
from unclip.activation_checkpointing import enable_activation_checkpointing
from unclip.autoregressive import TextImageTransformer
from unclip.clip import ContrastiveLoss, OpenClipEncoder
from unclip.data.collate import collate_dicts
from unclip.decoder import Decoder, Upsampler
from unclip.decoder.unet import AttentionBlock, Downsample, ResBlock, Upsample
from unclip.dvae import DiscreteVAE
from unclip.embedding import TextCondition
from unclip.jobs import start_job
from unclip.prior import DiffusionPrior
from unclip.training import Trainer

EMBED_DIM, TOKEN_DIM, TEXT_LENGTH, NUM_STEPS = 16, 8, 6, 50
END_ID = 49407


def _text(batch: int, generator: torch.Generator) -> TextCondition:
    lengths = torch.randint(2, TEXT_LENGTH + 1, (batch,), generator=generator)
    mask = torch.arange(TEXT_LENGTH)[None] < lengths[:, None]
    tokens = torch.where(mask, torch.randint(1, 60, (batch, TEXT_LENGTH), generator=generator), 0)
    tokens[torch.arange(batch), lengths - 1] = 63  # the end token: the highest id
    return TextCondition(embed=F.normalize(torch.randn(batch, EMBED_DIM, generator=generator), dim=-1), tokens=tokens,
                         token_embeds=torch.zeros(batch, TEXT_LENGTH, TOKEN_DIM), mask=mask)


def decoder_case():
    """The decoder's UNet as the decoder builds it: attention at 8 px and in the middle, reading the caption
    transformer's context tokens; its output layers enlivened, so every path carries a gradient."""
    model = enliven(Decoder(image_size=16, image_embed_dim=EMBED_DIM, text_length=TEXT_LENGTH, unet=TINY_UNET,
                            caption_width=32, caption_layers=1, caption_heads=2, vocab_size=64, num_steps=NUM_STEPS))
    g = torch.Generator().manual_seed(1)
    images, text = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, _text(4, g)
    drops = {"drop_image_embed": torch.tensor([False, True, False, False]),
             "drop_caption": torch.tensor([False, False, True, False])}

    def loss(model):
        return model.training_loss(images, text.embed, text, t=torch.tensor([3, 17, 30, 49]),
                                   noise=torch.randn(images.shape, generator=torch.Generator().manual_seed(2)), **drops)

    unet = model.unet
    twice = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock, Upsample))]
    twice += [block.mlp for block in model.caption_encoder.blocks]
    once = [unet.input_conv, unet.time_embed, unet.output] + [m for m in unet.modules() if isinstance(m, Downsample)]
    assert any(m.context_kv is not None for m in twice if isinstance(m, AttentionBlock))  # attention reads context
    return model, loss, twice, once


def upsampler_case():
    """A conv-only upsampler UNet (no attention, as the 64 -> 256 stage), its own random draws in the loss."""
    model = enliven(Upsampler(low_res_size=8, image_size=16, unet={**TINY_UNET, "attention_resolutions": []},
                              num_steps=NUM_STEPS))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    twice = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock, Upsample))]
    once = [model.unet.input_conv, model.unet.output] + [m for m in model.modules() if isinstance(m, Downsample)]
    return model, lambda model: model.training_loss(images), twice, once


def prior_case():
    """The diffusion prior's transformer, with dropout: the recomputation draws the same dropout masks."""
    model = DiffusionPrior(embed_dim=EMBED_DIM, token_dim=TOKEN_DIM, text_length=TEXT_LENGTH,
                           net=dict(width=32, depth=2, heads=2, dropout=0.1), num_steps=NUM_STEPS, cond_drop_prob=0.3)
    g = torch.Generator().manual_seed(1)
    model.fit_normalisation(F.normalize(torch.randn(64, EMBED_DIM, generator=g), dim=-1))
    text = _text(4, g)
    batch = {"image_embed": F.normalize(torch.randn(4, EMBED_DIM, generator=g), dim=-1), "text_embed": text.embed,
             "token_embeds": torch.randn(4, TEXT_LENGTH, TOKEN_DIM, generator=g), "mask": text.mask}
    twice = [module for block in model.net.blocks for module in (block.attn, block.ff)]
    return model, lambda model: model.training_loss(batch), twice, [model.net.to_out, model.net.text_proj]


def tiny_dalle(**overrides) -> TextImageTransformer:
    return TextImageTransformer(text_vocab=[*range(300, 320), END_ID], text_length=8, image_vocab_size=16,
                                image_length=16, **{"width": 32, "depth": 2, "heads": 2, **overrides})


def dalle_case():
    """The DALL-E transformer, with dropout and captions dropped at random (the loss's own draws)."""
    model = tiny_dalle(dropout=0.1, cond_drop_prob=0.3)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(300, 320, (4, 8), generator=g)
    text[:, 5] = END_ID
    image = torch.randint(0, 16, (4, 16), generator=g)
    blocks = model.transformer.blocks
    twice = [module for block in blocks for module in (block.attention, block.mlp)]
    return model, lambda model: model.training_loss(text, image), twice, [model.image_head, model.text_head]


def clip_case():
    """open_clip's own checkpointing (CLIP training), turned on through its ``set_grad_checkpointing``."""
    model = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro")
    batch = {"image": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "caption": ["a red circle", "a blue square", "two green triangles", "a small yellow star"]}
    resblocks = [*model.model.transformer.resblocks, *model.model.visual.transformer.resblocks]
    twice = [block.mlp for block in resblocks]
    return model, lambda model: ContrastiveLoss()(model, batch), twice, [model.model.visual.conv1]


CASES = {"decoder": decoder_case, "upsampler": upsampler_case, "prior": prior_case, "dalle": dalle_case,
         "clip": clip_case}


def _count_calls(modules) -> Counter:
    """Forward calls per module (by position in ``modules``), counted from now on as they start (a recomputation
    stops early, once it has every activation the backward needs: the last module's forward may not finish)."""
    calls: Counter = Counter()
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda *_, i=i: calls.update([i]))
    return calls


def _step(model, loss_fn) -> tuple[torch.Tensor, dict]:
    """One training forward and backward from the same random state: the loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = loss_fn(model)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpointing_gives_the_same_loss_and_gradients_recomputing_the_checkpointed_layers(name):
    torch.manual_seed(0)
    model, loss_fn, twice, once = CASES[name]()
    model.train()
    calls = _count_calls(twice + once)
    loss, grads = _step(model, loss_fn)
    calls_without = [calls[i] for i in range(len(twice) + len(once))]
    calls.clear()
    assert enable_activation_checkpointing(model) >= 1
    checkpointed_loss, checkpointed_grads = _step(model, loss_fn)

    assert len(grads) == len(list(model.parameters()))  # every weight has a gradient to compare
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(checkpointed_grads[key], grads[key], rtol=1e-6, atol=1e-8, msg=key)
    assert min(calls_without) >= 1
    # the checkpointed layers run their forward again in the backward; the layers around them do not
    expected = [2 * n for n in calls_without[:len(twice)]] + calls_without[len(twice):]
    assert [calls[i] for i in range(len(twice) + len(once))] == expected


def _output(model, loss_fn) -> torch.Tensor:
    torch.manual_seed(3)
    return loss_fn(model)["loss"].detach()


@pytest.mark.parametrize("name", ["decoder", "prior", "dalle"])
def test_sampling_and_evaluation_never_checkpoint(name, monkeypatch):
    """Under no_grad (sampling) or in eval mode nothing runs under torch.utils.checkpoint, and the output is the
    same as without the setting; training with gradients does checkpoint."""
    checkpointed = []
    real = activation_checkpointing.checkpoint
    monkeypatch.setattr(activation_checkpointing, "checkpoint", lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model, loss_fn, *_ = CASES[name]()
    model.eval()
    plain = _output(model, loss_fn)
    enable_activation_checkpointing(model)
    model.train()
    with torch.no_grad():
        _output(model, loss_fn)
    model.eval()
    torch.testing.assert_close(_output(model, loss_fn), plain, rtol=0, atol=0)
    assert checkpointed == []
    model.train()
    _output(model, loss_fn)
    assert checkpointed


def test_the_dalle_transformer_never_checkpoints_with_a_key_value_cache():
    """Sampling feeds positions through a cache; recomputing would append them twice. Even with gradients on in
    training mode, a cached call runs each block once and equals the uncached forward."""
    torch.manual_seed(0)
    model = tiny_dalle()
    enable_activation_checkpointing(model)
    transformer = model.transformer
    x = torch.randn(2, 6, 32, requires_grad=True)
    calls = _count_calls(list(transformer.blocks))
    cache = transformer.new_cache()
    cached = torch.cat([transformer(x[:, :4], cache), transformer(x[:, 4:], cache)], dim=1)
    assert cache.length == 6 and sum(calls.values()) == 2 * len(transformer.blocks)
    torch.testing.assert_close(cached, transformer(x), rtol=1e-5, atol=1e-6)


def test_the_flag_changes_neither_the_saved_config_nor_the_weight_names():
    torch.manual_seed(0)
    model, *_ = decoder_case()
    config, names = model.config, list(model.state_dict())
    enable_activation_checkpointing(model)
    assert model.config == config and list(model.state_dict()) == names
    assert "unet.middle.0.norm1.weight" in names  # the middle block's weights keep their names


def _trainer(job: str, model, loss_fn, run_dir, checkpointing: bool) -> Trainer:
    """The Trainer a stage's job (``train/<stage>.py``) makes from its composed config with these overrides."""
    overrides = [f"trainer.activation_checkpointing={str(checkpointing).lower()}", "trainer.max_steps=2",
                 "trainer.batch_size=4", "trainer.lr=1e-3", "trainer.warmup_steps=1", "trainer.mixed_precision=no",
                 "trainer.ema_beta=0.5", "trainer.ema_update_after_step=0", "trainer.checkpoint_every=0",
                 "trainer.log_every=1", "trainer.progress=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        config = OmegaConf.to_container(compose(config_name=job, overrides=overrides), resolve=True)
    return start_job(config, run_dir).trainer(model, loss_fn, _embeddings(), stage="prior", space_fn=lambda m: None,
                                              collate_fn=collate_dicts)


def _embeddings() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"image_embed": F.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
             "text_embed": F.normalize(torch.randn(EMBED_DIM, generator=g), dim=0),
             "token_embeds": torch.randn(TEXT_LENGTH, TOKEN_DIM, generator=g),
             "mask": torch.arange(TEXT_LENGTH) < 3 + i % 3} for i in range(8)]


def test_the_trainer_setting_turns_checkpointing_on_and_trains_the_same_weights(tmp_path):
    """python train/prior.py trainer.activation_checkpointing=true: the stage's blocks recompute in every step, the
    run ends with the weights of a run without it, and saves the same model config (the trainer's records the flag)."""
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, loss_fn, twice, _ = prior_case()
        calls = _count_calls(twice)
        trainer = _trainer("train_prior", model, lambda model, batch: model.training_loss(batch),
                           tmp_path / str(checkpointing), checkpointing)
        trainer.fit()
        runs[checkpointing] = trainer
        assert set(calls.values()) == {2 * 2 if checkpointing else 2}  # 2 steps, each layer's forward once or twice
        assert all(block.activation_checkpointing == checkpointing for block in model.net.blocks)
        assert not any(block.activation_checkpointing for block in trainer.ema.ema_model.net.blocks)
    saved = {c: tmp_path / str(c) / "checkpoints" / "step-00000002" for c in runs}
    configs = {c: json.loads((saved[c] / "config.json").read_text()) for c in runs}
    assert configs[True]["model"] == configs[False]["model"]
    assert [configs[c]["trainer"]["activation_checkpointing"] for c in (False, True)] == [False, True]
    plain, checkpointed = (load_file(saved[c] / "model.safetensors") for c in (False, True))
    assert checkpointed.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)


def test_a_model_with_nothing_to_checkpoint_is_an_error_before_training(tmp_path):
    """python train/dvae.py trainer.activation_checkpointing=true: refused, naming the model, before any step."""
    model = DiscreteVAE(**TINY_DVAE)
    with pytest.raises(ValueError, match=r"trainer.activation_checkpointing=true, but this stage's model, DiscreteVAE, "
                                         r"has no layers that can recompute their activations; it is supported by "
                                         r"the diffusion UNet .*Set trainer.activation_checkpointing=false"):
        _trainer("train_dvae", model, lambda model, batch: {"loss": model(batch)}, tmp_path / "run", True)
    assert not (tmp_path / "run").exists()
