"""Pretrained CLIPs from local files: a transformers CLIPModel directory, open_clip weights files, importing
either as a run's CLIP stage, and exporting our CLIP to open_clip's own layout. Nothing is downloaded: the
tests build tiny random models and the CLIP tokenizer files from open_clip's bundled BPE merges."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, MICRO_CLIP
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from stages import TINY_UNET
from test_jobs import _run
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from unclip.checkpoint import load_stage, read_stage_config, save_stage
from unclip.clip import HFClipEncoder, OpenClipEncoder
from unclip.clip.export import export_open_clip
from unclip.clip.export import main as export_main
from unclip.config import build
from unclip.decoder import Decoder
from unclip.embedding import ClipEncoder
from unclip.images import from_pil
from unclip.pipelines import UnCLIPPipeline
from unclip.weights import CheckpointError

CAPTIONS = ["a red circle", "A small BLUE square, on the left!", "two triangles: green & pink", "don't stop 123"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# -- building a tiny transformers CLIP directory offline ---------------------------------------------
def write_clip_tokenizer_files(directory: Path) -> int:
    """vocab.json + merges.txt of the CLIP BPE tokenizer, from open_clip's bundled merges; returns the vocab size."""
    simple = open_clip.tokenizer.SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def make_hf_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny random CLIPModel (32-px images in 8-px patches, 16 tokens) saved as a transformers directory."""
    directory.mkdir(parents=True)
    vocab_size = write_clip_tokenizer_files(directory)
    assert vocab_size == 49408
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(MEAN),
                       image_std=list(STD)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")


@pytest.fixture(scope="module")
def hf_clip(hf_dir):
    return HFClipEncoder(str(hf_dir)).eval()


# -- HFClipEncoder -----------------------------------------------------------------------------------
def test_hf_clip_encodes_like_transformers_with_unit_norm_embeddings(hf_clip, hf_dir):
    assert isinstance(hf_clip, ClipEncoder)
    space = hf_clip.space
    assert (space.dim, space.text_length, space.token_dim, space.image_size) == (24, 16, 32, 32)
    assert space.image_mean == MEAN and space.image_std == STD  # read from preprocessor_config.json
    with torch.no_grad():
        cond = hf_clip.encode_text(CAPTIONS[:2])
        images = torch.rand(3, 3, 32, 32) * 2 - 1
        image_embed = hf_clip.encode_image(images)
    assert cond.embed.shape == (2, 24) and cond.tokens.shape == (2, 16)
    assert cond.token_embeds.shape == (2, 16, 32) and cond.mask.shape == (2, 16)
    assert cond.mask[0].tolist() == [True] * 5 + [False] * 11  # start, a, red, circle, end
    torch.testing.assert_close(cond.embed.norm(dim=-1), torch.ones(2))
    assert image_embed.shape == (3, 24)
    torch.testing.assert_close(image_embed.norm(dim=-1), torch.ones(3))

    # transformers' own model and API give the same embeddings and token states
    reference = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    with torch.no_grad():
        text = reference.text_model(input_ids=cond.tokens, attention_mask=cond.mask.long())
        text_features = reference.get_text_features(input_ids=cond.tokens, attention_mask=cond.mask.long())
        pixels = ((images + 1) / 2 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        image_features = reference.get_image_features(pixel_values=pixels)
    text_features = getattr(text_features, "pooler_output", text_features)  # a tensor before transformers 5
    image_features = getattr(image_features, "pooler_output", image_features)
    torch.testing.assert_close(cond.token_embeds, text.last_hidden_state)
    torch.testing.assert_close(cond.embed, F.normalize(text_features, dim=-1))
    torch.testing.assert_close(image_embed, F.normalize(image_features, dim=-1))


def test_hf_clip_is_deterministic_and_resizes_images(hf_clip, hf_dir):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    node = OmegaConf.to_container(OmegaConf.load(CONF / "clip" / "hf_local.yaml"))
    assert node["path"] == "???"
    other = build({**node, "path": str(hf_dir)}).eval()  # conf/clip/hf_local.yaml
    with torch.no_grad():
        a, b = hf_clip.encode_text(CAPTIONS), other.encode_text(CAPTIONS)
        torch.testing.assert_close(a.embed, b.embed, rtol=0, atol=0)
        torch.testing.assert_close(a.token_embeds, b.token_embeds, rtol=0, atol=0)
        big = hf_clip.encode_image(images)
        torch.testing.assert_close(big, other.encode_image(images), rtol=0, atol=0)
    assert big.shape == (2, 24)
    assert other.space == hf_clip.space
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        hf_clip.encode_image(torch.zeros(1, 1, 32, 32))


def test_hf_tokenizer_agrees_with_open_clip(hf_clip):
    ours = hf_clip.tokenize(CAPTIONS)
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=16)(CAPTIONS)
    real = reference != 0  # open_clip pads with 0, transformers with the end token
    assert torch.equal(ours[real], reference[real])
    assert torch.equal(hf_clip.encode_text(ours).mask, real)
    # special-token strings in a caption cannot end it early
    sneaky = hf_clip.tokenize(["a red <|endoftext|> circle &lt;|startoftext|&gt;"])
    assert torch.equal(sneaky, hf_clip.tokenize(["a red circle"]))
    with pytest.warns(UserWarning, match="truncated"):
        long = hf_clip.tokenize(["a red circle " * 30])
    assert long.shape == (1, 16) and long[0, -1].item() == hf_clip.tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_clip.tokenize(["a red circle"])


def test_missing_directory_or_tokenizer_is_a_clear_error(tmp_path, hf_dir):
    nowhere = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=rf"{nowhere} does not exist \(nothing is downloaded\)"):
        HFClipEncoder(str(tmp_path / "nowhere"))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_dir, no_tokenizer)
    (no_tokenizer / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(no_tokenizer))} has no tokenizer files"):
        HFClipEncoder(str(no_tokenizer))
    # files that give transformers' fallback tokenizer of just the special tokens
    (no_tokenizer / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (no_tokenizer / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match=r"has 2 tokens but the model's text vocab_size is 49408"):
        HFClipEncoder(str(no_tokenizer))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(hf_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(no_weights))} has no weights"):
        HFClipEncoder(str(no_weights))


def test_hf_stage_round_trip_and_fingerprint(hf_clip, hf_dir, tmp_path):
    stage = save_stage(tmp_path / "clip", hf_clip, stage="clip", space=hf_clip.compute_space())
    _, config, space = read_stage_config(stage)
    assert config["model"]["path"] == str(hf_dir.resolve()) and config["model"]["load_weights"] is False
    loaded = load_stage(stage, stage="clip").model.eval()
    assert isinstance(loaded, HFClipEncoder)
    assert loaded.compute_space() == space == hf_clip.space
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(CAPTIONS).embed, hf_clip.encode_text(CAPTIONS).embed)
    # the same model in another directory is the same space; other weights are another
    moved = tmp_path / "moved"
    shutil.copytree(hf_dir, moved)
    assert HFClipEncoder(str(moved), name="other").space.fingerprint == space.fingerprint
    assert HFClipEncoder(str(make_hf_clip(tmp_path / "seed1", seed=1))).space.fingerprint != space.fingerprint
    changed = HFClipEncoder(str(moved))
    assert changed.space.fingerprint == space.fingerprint
    state = changed.state_dict()
    state["model.logit_scale"] = state["model.logit_scale"] + 1
    changed.load_state_dict(state)
    assert changed.space.fingerprint != space.fingerprint  # the cached space was reset
    # a stage reads the model's directory again when it is loaded: the directory must stay
    stage_of_moved = save_stage(tmp_path / "clip-moved", HFClipEncoder(str(moved)), stage="clip", space=None)
    shutil.rmtree(moved)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(moved))} does not exist"):
        load_stage(stage_of_moved)


# -- open_clip weights files -------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")  # unpickling would create the marker file


@pytest.mark.parametrize("layout", ["safetensors", "pt_plain", "pt_open_clip_training"])
def test_open_clip_weights_files_load(micro_clip, tmp_path, layout):
    state = {k: v.clone() for k, v in micro_clip.model.state_dict().items()}
    if layout == "safetensors":
        path = tmp_path / "micro.safetensors"
        save_file(state, str(path))
    elif layout == "pt_plain":
        path = tmp_path / "micro.pt"
        torch.save(state, path)
    else:  # what open_clip's trainer writes: epoch, name, DDP-prefixed state_dict, optimizer
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "micro", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, path)
    encoder = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro", checkpoint=str(path))
    assert encoder.space == micro_clip.space  # the checkpoint path is not part of the identity
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode_text(CAPTIONS).embed, micro_clip.encode_text(CAPTIONS).embed)


def test_bad_open_clip_weights_files_are_clear_errors(micro_clip, tmp_path):
    node = OmegaConf.to_container(OmegaConf.load(CONF / "clip" / "open_clip_file.yaml"))
    assert node["checkpoint"] == "???" and node["model_name"] == "ViT-B-32"
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=rf"weights file {re.escape(str(missing))} does not exist"):
        build({**node, "checkpoint": str(missing)})
    micro = tmp_path / "micro.safetensors"
    save_file(dict(micro_clip.model.state_dict()), str(micro))
    wrong = rf"checkpoint {re.escape(str(micro))} does not fit the architecture ViT-B-32: .*size mismatch"
    with pytest.raises(CheckpointError, match=wrong):
        build({**node, "checkpoint": str(micro)})
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": dict(micro_clip.model.state_dict()), "hook": _RunsCode(marker)}, evil)
    unsafe = rf"cannot load weights file {re.escape(str(evil))} safely \(weights_only=True\)"
    with pytest.raises(CheckpointError, match=unsafe):
        OpenClipEncoder(model_cfg=MICRO_CLIP, checkpoint=str(evil))
    assert not marker.exists()


# -- exporting our CLIP to open_clip's layout --------------------------------------------------------
def test_export_round_trips_through_open_clip(micro_clip, tmp_path, capsys):
    stage = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.compute_space())
    out = tmp_path / "exported"
    export_main([str(stage), str(out), "--pt"])
    assert f"local-dir:{out}" in capsys.readouterr().out
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == list(micro_clip.image_mean)
    assert config["unclip"]["space"]["fingerprint"] == micro_clip.space.fingerprint

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(3)]
    with torch.no_grad():
        text = model.encode_text(tokenizer(CAPTIONS), normalize=True)
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        torch.testing.assert_close(text, micro_clip.encode_text(CAPTIONS).embed)
        torch.testing.assert_close(image, micro_clip.encode_image(from_pil(images, 32)), atol=1e-5, rtol=1e-4)
        # the .pt holds the same weights, for open_clip.create_model(name, pretrained=<file>) and load_checkpoint
        fresh = open_clip.CLIP(**MICRO_CLIP).eval()
        open_clip.load_checkpoint(fresh, str(out / "open_clip_model.pt"))
        torch.testing.assert_close(fresh.encode_text(tokenizer(CAPTIONS), normalize=True), text, rtol=0, atol=0)


def test_export_refuses_a_transformers_clip(hf_clip, tmp_path):
    stage = save_stage(tmp_path / "clip", hf_clip, stage="clip", space=hf_clip.space)
    with pytest.raises(TypeError, match=r"holds a HFClipEncoder, not an open_clip CLIP"):
        export_open_clip(stage, tmp_path / "out")


# -- an external CLIP as the CLIP stage of a prior run -------------------------------------------------
PRIOR = ["prior.net.width=32", "prior.net.depth=1", "prior.net.heads=2", "prior.num_steps=50", "trainer.max_steps=5",
         "trainer.batch_size=8", "trainer.mixed_precision=no", "trainer.warmup_steps=1",
         "trainer.ema_update_after_step=1", "trainer.checkpoint_every=5", "trainer.progress=false", "eval_items=8",
         "sampling.steps=2", "sampling.num_candidates=1"]


def _import_embed_and_train_prior(run: Path, clip_overrides: list[str]) -> dict:
    """train/import_clip.py -> train/embed.py -> train/prior.py; the spaces each job recorded."""
    metrics = json.loads(_run("train/import_clip.py", "name=test", f"hydra.run.dir={run / 'clip'}",
                              *clip_overrides).strip().splitlines()[-1])
    embed = json.loads(_run("train/embed.py", f"hydra.run.dir={run / 'embed'}", f"clip_checkpoint={run / 'clip'}",
                            "splits.train=32", "splits.val=8", "splits.heldout=8", "batch_size=16",
                            "bf16=false").strip().splitlines()[-1])
    _run("train/prior.py", f"hydra.run.dir={run / 'prior'}", f"embeddings={run / 'embed'}", *PRIOR)
    prior = load_stage(run / "prior", stage="prior")
    assert prior.path.name == "step-00000005"
    return {"import": metrics["space"], "embed": embed["space"], "prior": prior.space.fingerprint}


@pytest.mark.slow
def test_transformers_clip_is_the_clip_stage_of_a_prior_run(hf_clip, hf_dir, tmp_path):
    spaces = _import_embed_and_train_prior(tmp_path, [f"clip.path={hf_dir}"])
    assert set(spaces.values()) == {hf_clip.space.fingerprint}
    clip = load_stage(tmp_path / "clip", stage="clip")
    assert isinstance(clip.model, HFClipEncoder) and clip.path.name == "step-00000000"
    # the decoder and the pipeline take the imported stage unchanged
    space = clip.space
    decoder = Decoder(image_size=16, image_embed_dim=space.dim, text_length=space.text_length, unet=TINY_UNET,
                      caption_width=32, caption_layers=1, caption_heads=2, num_steps=50)
    save_stage(tmp_path / "decoder", decoder, stage="decoder", space=space)
    pipe = UnCLIPPipeline.from_pretrained(clip=tmp_path / "clip", prior=tmp_path / "prior",
                                          decoder=tmp_path / "decoder", device="cpu")
    images = pipe.generate(["a red circle"], prior_steps=2, decoder_steps=2)
    assert len(images) == 1 and images[0].size == (16, 16)
    # importing into a run that already has a CLIP stage needs overwrite=true
    with pytest.raises(AssertionError, match="already holds a CLIP stage.*overwrite=true"):
        _run("train/import_clip.py", "name=test", f"hydra.run.dir={tmp_path / 'clip'}", f"clip.path={hf_dir}")


@pytest.mark.slow
def test_open_clip_weights_file_is_the_clip_stage_of_a_prior_run(micro_clip, tmp_path):
    weights = tmp_path / "micro.safetensors"
    save_file(dict(micro_clip.model.state_dict()), str(weights))
    torch.save({"state_dict": {f"module.{k}": v for k, v in micro_clip.model.state_dict().items()}},
               tmp_path / "micro.pt")
    spaces = _import_embed_and_train_prior(tmp_path / "run", ["clip=micro_vit", f"+clip.checkpoint={weights}"])
    # the same weights from the .pt file are the same space (conf/clip/micro_vit.yaml names it "micro-vit")
    from_pt = OpenClipEncoder(model_cfg=MICRO_CLIP, name="micro-vit", checkpoint=str(tmp_path / "micro.pt"))
    assert set(spaces.values()) == {from_pt.space.fingerprint}
