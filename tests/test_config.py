"""Every config in conf/ composes, and composes into objects that build."""

import re
import subprocess
import sys

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from unclip.config import build

JOBS = sorted(p.stem for p in CONF.glob("train_*.yaml")) + sorted(p.stem for p in CONF.glob("pipeline_*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _groups():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "experiment"):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_job_composes_with_every_experiment(job, experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=job, overrides=[f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("group,option", list(_groups()))
def test_every_group_option_composes_into_a_job(group, option):
    job = next((j for j in JOBS if group in _job_groups(j)), None)
    if job is None:
        pytest.fail(f"conf/{group}/ is used by no job config in conf/")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=job, overrides=[f"{group}={option}"])
    # ???: a local file or folder the user names (e.g. data.root, clip.path)
    missing = [key for key in cfg[group] if OmegaConf.is_missing(cfg[group], key)]
    for key in missing:
        cfg[group][key] = "/a/path/the/user/names"
    node = OmegaConf.to_container(cfg, resolve=True)[group]
    if group in ("clip",) and not missing:
        assert build(node).space.dim > 0


def _job_groups(job):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=job, return_hydra_config=True)
    return set(cfg.hydra.runtime.choices)


@pytest.mark.parametrize("experiment", ["shapes", "emoji"])
def test_demo_config_composes_with_every_preset(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="demo", overrides=[f"experiment={experiment}"]), resolve=True)
    assert cfg["preset"] == "auto" and {"full", "quick", "gpu"} <= set(cfg["presets"])  # auto: gpu or full
    from unclip.pipelines import GenerationSettings
    settings = GenerationSettings(**cfg["generation"])  # conf/generation/reranked.yaml: settings the pipeline takes
    settings.check()
    assert settings.rerank > 1  # the demo's pipeline keeps the CLIP's favourite of several candidates
    for name, preset in cfg["presets"].items():
        assert set(preset) - {"with_upsampler", "generation"} == {"clip", "embed", "prior", "decoder", "upsampler",
                                                                   "upsampler_hr", "eval_items"}, name
        GenerationSettings(**{**cfg["generation"], **preset.get("generation", {})}).check()  # its own, valid ones
    assert cfg["presets"]["quick"]["generation"] == {"prior_guidance": 3.0}
    assert cfg["presets"]["full"]["generation"] == {"decoder_guidance": 1.5}  # the full decoder composes guided less
    from unclip.pipelines import DalleSettings
    dalle = DalleSettings(**cfg["dalle_generation"])  # generator=dalle's pipeline settings, valid
    dalle.check()
    assert (dalle.rerank, dalle.guidance_scale) == (16, 1.5)  # DALL-E's demo: the best of 16, guided draws
    evaluator = {"shapes": "unclip.eval.shapes.ShapesEvaluator", "emoji": "unclip.eval.captions.CaptionsEvaluator"}
    assert cfg["data"]["evaluator"]["_target_"] == evaluator[experiment]  # the data says how it is judged
    assert cfg["data"]["train"]["_target_"].endswith({"shapes": "ShapesDataset", "emoji": "EmojiDataset"}[experiment])


@pytest.mark.parametrize("job,pairs", [("train_dalle", 0.35), ("train_decoder", 0.5), ("train_dvae", 0.2)])
def test_a_stage_experiment_raises_its_training_pair_share_and_leaves_the_judged_splits(job, pairs):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name=job, overrides=["experiment=shapes", "data=shapes_pairs"]),
                                     resolve=True)
    assert cfg["data"]["train"]["pair_fraction"] == pairs  # the transformer / decoder learn pairs from more of them
    assert cfg["data"]["val"]["pair_fraction"] == cfg["data"]["heldout"]["pair_fraction"] == 0.2  # shapes_pairs'


@pytest.mark.parametrize("job", ["train_clip", "train_embed", "train_decoder", "train_upsampler"])
def test_experiment_emoji_switches_every_job_to_the_emoji_data(job):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name=job, overrides=["experiment=emoji"]), resolve=True)
    assert cfg["name"] == "emoji"
    splits = {split: node for split, node in cfg["data"].items() if isinstance(node, dict) and split != "evaluator"}
    assert {split: node["_target_"] for split, node in splits.items()} == {
        split: "unclip.data.emoji.EmojiDataset" for split in ("train", "val", "train_names")}


def test_command_line_overrides_reach_the_trainer():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="train_clip", overrides=["experiment=shapes", "trainer.max_steps=7"])
    assert cfg.trainer.max_steps == 7
    assert cfg.name == "shapes"


def test_trainer_and_generation_defaults_come_from_their_dataclasses():
    from dataclasses import asdict

    from unclip.pipelines import GenerationSettings
    from unclip.training import TrainerConfig

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="train_sample"), resolve=True)
        trainer = OmegaConf.to_container(compose(config_name="train_prior").trainer, resolve=True)
    assert trainer == {**asdict(TrainerConfig()), "betas": list(TrainerConfig().betas)}
    assert cfg["pipeline"]["settings"] == asdict(GenerationSettings())


@pytest.mark.parametrize("override,message", [
    ("trainer.lr=abc", r"Value 'abc' of type 'str' could not be converted to Float\s+full_key: trainer.lr"),
    ("trainer.max_steps=2.5", r"Value '2.5' of type 'float' could not be converted to Integer\s+full_key: trainer.max_steps"),
    ("trainer.max_stepz=3", r"Key 'max_stepz' not in 'TrainerConfig'\s+full_key: trainer.max_stepz"),
])
def test_a_trainer_setting_of_the_wrong_type_or_name_is_an_error_naming_it(override, message):
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        with pytest.raises(ConfigCompositionException) as error:
            compose(config_name="train_clip", overrides=[override])
    assert re.search(message, str(error.value.__cause__)), str(error.value.__cause__)


@pytest.mark.parametrize("override", ["+bogus=1", "+trainer.bogus=1", "+data.val_fractoin=0.5"])
def test_a_job_refuses_an_added_key_that_nothing_reads(override, tmp_path):
    proc = subprocess.run([sys.executable, "train/clip.py", f"hydra.run.dir={tmp_path}", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    key = override.lstrip("+").split("=")[0]
    assert proc.returncode != 0 and f"{override}: '{key}' is not a setting of this job" in proc.stderr, proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_the_generator_names_are_the_pipeline_registrys():
    """conf/ names a generator by its key in unclip.pipelines.GENERATORS; the demo's output directory is the class's."""
    from unclip.pipelines import GENERATORS

    for node in sorted((CONF / "pipeline").glob("*.yaml")):
        assert OmegaConf.load(node).generator in GENERATORS, node
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name, cls in GENERATORS.items():
            cfg = compose(config_name="demo", overrides=[f"generator={name}"])
            assert cfg.out == f"outputs/{cls.demo_dir}", name
        with pytest.raises(Exception, match=r"generator must be one of \['dalle', 'unclip'\], got 'dall-e'"):
            OmegaConf.to_container(compose(config_name="demo", overrides=["generator=dall-e"]), resolve=True)


@pytest.mark.parametrize("setting,value,message", [
    ("grad_clip", -1.0, r"trainer.grad_clip must be a finite number > 0 .*or 0 or null for no clipping, got -1.0"),
    ("grad_clip", float("nan"), r"trainer.grad_clip must be a finite number > 0 .*got nan"),
    ("min_lr_ratio", -5.0, r"trainer.min_lr_ratio must be in \[0, 1\] .*got -5.0"),
    ("weight_decay", -100.0, r"trainer.weight_decay must be a finite number >= 0, got -100.0"),
    ("weight_decay", float("nan"), r"trainer.weight_decay must be a finite number >= 0, got nan"),
    ("lr", float("inf"), r"trainer.lr must be a finite number > 0, got inf"),
    ("betas", [0.9], r"trainer.betas must be two numbers in \[0, 1\) .*got \[0.9\]"),
    ("betas", [0.9, 1.5], r"trainer.betas must be two numbers in \[0, 1\) .*got \[0.9, 1.5\]"),
    ("ema_update_every", 0, r"trainer.ema_update_every must be >= 1, got 0"),
    ("ema_update_after_step", -1, r"trainer.ema_update_after_step must be >= 0, got -1"),
    ("seed", -1, r"trainer.seed must be in \[0, 2\*\*32\), got -1"),
])
def test_trainer_values_that_would_train_wrong_are_refused_naming_the_setting(setting, value, message):
    from unclip.training import TrainerConfig

    with pytest.raises(ValueError, match=message):
        TrainerConfig.from_dict({setting: value})


@pytest.mark.parametrize("override", ["trainer.weight_decay=nan", "trainer.lr=inf", "trainer.grad_clip=nan"])
def test_a_clip_job_with_a_non_finite_setting_is_refused_before_training(override, tmp_path):
    """The report's reproduction: these ran 8 steps, saved NaN weights and wrote every R@k = 1.0."""
    proc = subprocess.run([sys.executable, "train/clip.py", f"hydra.run.dir={tmp_path}", "clip=micro_vit",
                           "data.image_size=32", "trainer.max_steps=8", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    setting = override.split("=")[0]
    assert proc.returncode != 0 and f"{setting} must be a finite number" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()

