import warnings

import open_clip
import pytest
import torch

from unclip.autoregressive import (
    PAD,
    UNK,
    TextImageTransformer,
    TextVocabulary,
    filter_logits,
    guided_logits,
)
from unclip.checkpoint import load_stage, save_stage

END = 49407
CAPTIONS = ["a red circle", "a blue square at the top", "a small green triangle on the left", "a pink diamond"]
TOKENIZER = open_clip.tokenizer.SimpleTokenizer(context_length=16)  # the CLIP stage's tokenizer


def clip_tokens(captions) -> torch.Tensor:
    return TOKENIZER(list(captions))


def tiny_model(seed: int = 0, **kwargs) -> TextImageTransformer:
    torch.manual_seed(seed)
    vocab = TextVocabulary.from_token_rows(clip_tokens(CAPTIONS), END)
    settings = dict(text_vocab=vocab.source_ids.tolist(), text_length=10, image_vocab_size=16, image_length=6,
                    width=32, depth=2, heads=2)
    return TextImageTransformer(**{**settings, **kwargs}).eval()


def test_the_vocabulary_maps_clip_ids_to_compact_ids_with_unk_and_padding():
    rows = clip_tokens(CAPTIONS)
    vocab = TextVocabulary.from_token_rows(rows, END)
    words = {i for row in rows.tolist() for i in row if i != 0}
    assert len(vocab) == 2 + len(words)  # <unk>, <pad> and every id the captions use
    ids = vocab.encode(clip_tokens(["a red circle", "a purple circle"]), 8)
    red, purple = ids
    assert red.tolist()[5:] == [PAD] * 3  # start, a, red, circle, end; then padding
    assert purple[2] == UNK and purple[3] == red[3]  # "purple" was never seen; "circle" was
    assert ids.shape == (2, 8) and ids.max() < len(vocab)


def test_a_caption_longer_than_the_text_length_is_truncated_with_a_warning():
    vocab = TextVocabulary.from_token_rows(clip_tokens(CAPTIONS), END)
    long_row = clip_tokens(["a small green triangle on the left"])
    with pytest.warns(UserWarning, match="longer than the 5-token text length"):
        ids = vocab.encode(long_row, 5)
    full = vocab.encode(long_row, 16)
    assert ids.tolist()[0][:4] == full.tolist()[0][:4]
    end = vocab.encode(clip_tokens(["a"]), 5)[0, 2]
    assert ids[0, 4] == end  # cut like the CLIP tokenizer: the last kept position holds the end token
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vocab.encode(clip_tokens(["a red circle"]), 5)  # start, a, red, circle, end: fits, no warning


def test_padding_positions_get_one_learned_embedding_each():
    model = tiny_model()
    ids = model.text_ids(clip_tokens(["a red circle"]))
    embedded = model._embed_text(ids)[0]
    padding = (ids[0] == PAD).nonzero().flatten()
    assert len(padding) == 5
    assert torch.equal(embedded[padding], model.padding_embed[padding])
    assert not torch.allclose(embedded[padding[0]], embedded[padding[1]])


def test_the_loss_weights_text_by_one_eighth_and_image_by_seven_eighths():
    model = tiny_model()
    text = clip_tokens(CAPTIONS)
    images = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(0))
    drop = torch.tensor([False, True, False, False])
    out = model.training_loss(text, images, drop=drop)
    # by hand: the model's logits for the same inputs (a dropped caption is the all-padding one)
    ids = model.text_ids(text)
    ids[1] = PAD
    text_logits, image_logits = model.logits(ids, images)
    image_nll = -image_logits.log_softmax(-1).gather(-1, images[..., None]).mean()
    kept = [0, 2, 3]  # a dropped caption has no text loss
    text_nll = -text_logits[kept].log_softmax(-1).gather(-1, ids[kept, 1:, None]).mean()
    assert out["text_loss"].item() == pytest.approx(text_nll.item(), rel=1e-5)
    assert out["image_loss"].item() == pytest.approx(image_nll.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(text_nll.item() / 8 + 7 * image_nll.item() / 8, rel=1e-5)
    assert text_logits.shape == (4, 9, len(model.vocabulary)) and image_logits.shape == (4, 6, 16)


def test_the_image_tokens_never_see_the_future():
    model = tiny_model()
    text = model.text_ids(clip_tokens(CAPTIONS[:1]))
    images = torch.tensor([[1, 2, 3, 4, 5, 6]])
    changed = torch.tensor([[1, 2, 3, 9, 9, 9]])
    _, before = model.logits(text, images)
    _, after = model.logits(text, changed)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # logits for tokens 0..3 see tokens < 3 only
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_the_loss_goes_down_and_greedy_sampling_reproduces_what_it_learned():
    model = tiny_model(cond_drop_prob=0.0).train()
    text = clip_tokens(CAPTIONS)
    images = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(1))  # one sequence per caption
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.training_loss(text, images)["image_loss"].item()
    for _ in range(60):
        loss = model.training_loss(text, images)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model.training_loss(text, images)["image_loss"].item()
    assert last < 0.1 * first, (first, last)
    assert torch.equal(model.eval().sample(text, top_k=1), images)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_sampling_with_the_cache_gives_the_same_tokens_as_without(guidance_scale):
    model = tiny_model()
    text = clip_tokens(CAPTIONS)
    kwargs = dict(guidance_scale=guidance_scale, temperature=1.5)
    cached = model.sample(text, generator=torch.Generator().manual_seed(3), **kwargs)
    full = model.sample(text, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert torch.equal(cached, full)
    assert cached.shape == (4, 6) and len(cached.unique()) > 4  # a random model: varied tokens, not a constant
    prime = torch.tensor([[1, 2]] * 4)
    primed = model.sample(text, prime=prime, generator=torch.Generator().manual_seed(3), **kwargs)
    primed_full = model.sample(text, prime=prime, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert torch.equal(primed, primed_full) and torch.equal(primed[:, :2], prime)


def test_guidance_at_scale_one_is_the_conditional_model():
    model = tiny_model()
    text = clip_tokens(CAPTIONS)
    plain = model.sample(text, generator=torch.Generator().manual_seed(5))
    guided = model.sample(text, guidance_scale=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, guided)
    strong = model.sample(text, guidance_scale=8.0, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(plain, strong)
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(guided_logits(cond, uncond, 3.0), torch.tensor([[4.0, -2.0]]))  # uncond + 3 (cond - uncond)


def test_top_k_and_top_p_keep_the_most_likely_tokens():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=1) == [False, True, False, False]
    assert kept(top_k=2) == [False, True, False, True]
    assert kept(top_k=4) == [True] * 4
    assert kept(top_p=0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(top_p=0.6) == [False, True, False, True]  # 0.5 + 0.25
    assert kept(top_p=0.9) == [False, True, True, True]  # 0.5 + 0.25 + 0.15
    assert kept(top_p=1.0) == [True] * 4
    assert kept(top_k=3, top_p=0.6) == [False, True, False, True]
    model = tiny_model()
    text = clip_tokens(CAPTIONS)
    greedy = model.sample(text, top_k=1)
    assert torch.equal(greedy, model.sample(text, top_k=1, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(greedy, model.sample(text, top_p=1e-6))  # the nucleus of one token is the argmax


def test_a_checkpoint_carries_its_vocabulary(tmp_path):
    model = tiny_model()
    save_stage(tmp_path / "dalle", model, stage="dalle", space=None)
    loaded = load_stage(tmp_path / "dalle", stage="dalle").model.eval()
    text = clip_tokens(["a red circle", "an orange circle"])
    assert torch.equal(loaded.text_ids(text), model.text_ids(text))
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.sample(text, generator=seed()), model.sample(text, generator=seed()))


def test_bad_sampling_settings_and_tokens_are_named():
    model = tiny_model()
    text = clip_tokens(CAPTIONS[:1])
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 16\].*got 0"):
        model.sample(text, top_k=0)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 16\].*got 17"):
        model.sample(text, top_k=17)
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
            model.sample(text, temperature=temperature)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.sample(text, top_p=0.0)
    with pytest.raises(ValueError, match=r"\[0, 16\).*from 0 to 16"):
        model.training_loss(text, torch.tensor([[0, 1, 2, 3, 4, 16]]))
    with pytest.raises(ValueError, match=r"\[B, 6\].*shape \(1, 5\)"):
        model.training_loss(text, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="prime must be"):
        model.sample(text, prime=torch.zeros(1, 6, dtype=torch.long))
    with pytest.warns(UserWarning, match="longer than the 10-token text length"):
        model.sample(clip_tokens(["a small green triangle on the left side of a big red square"]), top_k=1)
