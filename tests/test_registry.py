"""What a config may build: the classes marked @configurable / @register, nothing else, checked before any call.

The hostile configs are the ones a demanding user found (issue 17): an edited ``config.json`` naming a
function of the package that deletes a directory or writes a file. Each must be refused with its name,
with the victim untouched, both by ``load_stage`` and by ``UnCLIPPipeline.from_pretrained``.
"""

import json

import pytest
from conftest import MICRO_CLIP
from stages import micro_stages, save_micro_pipeline

from unclip.checkpoint import load_stage, write_manifest
from unclip.clip.open_clip_encoder import OPENAI_MEAN, OPENAI_STD
from unclip.config import UnsafeConfigError, build
from unclip.decoder import Decoder
from unclip.pipelines import UnCLIPPipeline
from unclip.prior import PriorTransformer
from unclip.weights import CheckpointError


def test_configurable_records_every_argument_with_defaults_and_rebuilds_an_equal_object():
    net = PriorTransformer(embed_dim=8, token_dim=8, text_length=4, width=16, depth=1, heads=2)
    assert net.config == {
        "_target_": "unclip.prior.transformer.PriorTransformer", "embed_dim": 8, "token_dim": 8, "text_length": 4,
        "width": 16, "depth": 1, "heads": 2, "dropout": 0.0, "ff_mult": 4, "use_caption_tokens": True,
    }
    assert build(net.config).config == net.config
    decoder = Decoder(image_size=16, image_embed_dim=8, text_length=4, caption="none",
                      unet={"base_channels": 32, "channel_mult": (1, 2), "attention_resolutions": (8,)})
    unet = decoder.config["unet"]
    assert unet["channel_mult"] == [1, 2] and unet["attention_resolutions"] == [8]  # JSON-ready
    assert json.loads(json.dumps(decoder.config)) == decoder.config
    decoder.config["image_size"] = 99  # a copy: the recorded config cannot be changed from outside
    assert decoder.config["image_size"] == 16


def test_saved_configs_keep_the_names_and_arguments_of_earlier_checkpoints():
    clip, prior, decoder, upsampler = micro_stages()
    # Exactly what the hand-written property gave: the CLIP's fingerprint hashes this dict.
    assert clip.config == {"_target_": "unclip.clip.OpenClipEncoder", "model_cfg": MICRO_CLIP, "name": "micro",
                           "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD)}
    assert prior.config["_target_"] == "unclip.prior.diffusion_prior.DiffusionPrior"
    assert decoder.config["_target_"] == "unclip.decoder.decoder.Decoder"
    assert decoder.config["unet"]["upsample_width"] == "next"  # the resolved default is saved
    assert upsampler.config["_target_"] == "unclip.decoder.upsampler.Upsampler"
    for model in (clip, prior, decoder, upsampler):
        assert build(model.config).config == model.config


@pytest.mark.parametrize("target", ["unclip.diffusion.GaussianDiffusion", "unclip.training.Trainer",
                                    "unclip.checkpoint.save_stage", "unclip.nothing.Here", "unclip.config.build"])
def test_only_registered_classes_are_built(target):
    with pytest.raises(UnsafeConfigError, match=rf"_target_ '{target}'; only classes of the unclip package registered"):
        build({"model": {"_target_": "unclip.prior.PassthroughPrior"}, "other": [{"_target_": target}]})


def _hostile_configs(tmp_path):
    """(config, victim) pairs: each config, if called, would delete or write the victim."""
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "precious.txt").write_text("keep me")
    victim_file = tmp_path / "victim.txt"
    victim_file.write_text("keep me")
    new_file = tmp_path / "written.safetensors"
    passthrough = {"_target_": "unclip.prior.PassthroughPrior"}
    return [
        ({"_target_": "unclip.checkpoint.save_stage", "directory": str(victim_dir), "model": passthrough,
          "stage": "prior", "space": None}, victim_dir),
        ({"_target_": "unclip.data.embeddings.save_file", "tensors": {}, "filename": str(victim_file)}, victim_file),
        ({"_target_": "unclip.checkpoint.save_model", "model": passthrough, "filename": str(new_file)}, new_file),
    ]


def _snapshot(path):
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes() if path.exists() else None


@pytest.mark.parametrize("which", [0, 1, 2], ids=["save_stage", "embeddings.save_file", "save_model"])
def test_a_config_naming_a_function_is_refused_by_load_stage_and_from_pretrained(tmp_path, which):
    stages = save_micro_pipeline(tmp_path / "stages")
    pipeline = UnCLIPPipeline.from_pretrained(**stages, device="cpu").save_pretrained(tmp_path / "pipeline")
    hostile, victim = _hostile_configs(tmp_path)[which]
    before = _snapshot(victim)
    for config_file in (stages["prior"] / "config.json", pipeline / "decoder" / "config.json"):
        config = json.loads(config_file.read_text())
        config["model"] = hostile
        config_file.write_text(json.dumps(config))
        write_manifest(config_file.parent)  # whoever edits config.json can rewrite the manifest: the class check holds
    target = hostile["_target_"]
    with pytest.raises(CheckpointError, match=rf"(?s)refusing to load {stages['prior']}/config.json.*{target}"):
        load_stage(stages["prior"])
    with pytest.raises(CheckpointError, match=rf"(?s)refusing to load {pipeline}/decoder/config.json.*{target}"):
        UnCLIPPipeline.from_pretrained(pipeline, device="cpu")
    assert _snapshot(victim) == before, f"{victim} was changed by a refused config"


def test_arguments_that_do_not_fit_the_class_are_refused_before_anything_is_built():
    from unclip.config import ConfigError

    with pytest.raises(ConfigError, match=r"config.prior builds DiffusionPrior: got an unexpected keyword argument "
                                          r"'widht'; it takes: embed_dim, .*net"):
        build({"clip": {"_target_": "unclip.prior.PassthroughPrior"},
               "prior": {"_target_": "unclip.prior.DiffusionPrior", "embed_dim": 4, "token_dim": 4, "text_length": 2,
                         "widht": 8}})
