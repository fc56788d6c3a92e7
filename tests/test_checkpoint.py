import json
import re

import pytest
import torch

from unclip.checkpoint import (
    MANIFEST,
    load_stage,
    read_latest,
    save_run_checkpoint,
    save_stage,
    write_latest,
    write_manifest,
)
from unclip.config import UnsafeConfigError, build
from unclip.embedding import EmbeddingSpace
from unclip.weights import CheckpointError


def test_round_trip_gives_the_same_encoder(micro_clip, tmp_path):
    ema = type(micro_clip)(model_cfg=micro_clip.model_cfg)  # stands in for EMA weights
    path = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space, ema_model=ema)
    for use_ema, reference in ((False, micro_clip), (True, ema)):
        loaded = load_stage(path, stage="clip", use_ema=use_ema)
        assert loaded.space == micro_clip.space
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(loaded.model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(loaded.model.encode_text(["a red circle"]).embed, reference.encode_text(["a red circle"]).embed)
    # the space recorded is the space of the weights actually loaded
    assert load_stage(path, use_ema=False).model.compute_space() == micro_clip.space


def test_save_replaces_atomically_and_leaves_no_temporaries(micro_clip, tmp_path):
    save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_missing_truncated_and_wrong_stage_are_clear_errors(micro_clip, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_stage(tmp_path / "nope")
    path = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    with pytest.raises(CheckpointError, match="is a 'clip' checkpoint, expected a 'prior' one"):
        load_stage(path, stage="prior")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_stage(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a stage checkpoint"):
        load_stage(tmp_path / "empty")


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "unclip..os"])
def test_config_naming_code_outside_the_package_is_refused(micro_clip, tmp_path, target):
    path = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    config = json.loads((path / "config.json").read_text())
    config["model"] = {"_target_": target, "command": "touch pwned"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json is \d+ bytes where \d+ were written"):
        load_stage(path)  # the manifest catches the edit
    write_manifest(path)  # whoever edits config.json can rewrite the manifest too: the class check still refuses
    with pytest.raises(CheckpointError, match="only classes of the unclip package"):
        load_stage(path)
    with pytest.raises(UnsafeConfigError):
        build({"nested": [{"_target_": target}]})
    assert not (tmp_path / "pwned").exists()


def test_spaces_of_different_models_refuse_to_meet(micro_clip):
    other = EmbeddingSpace.from_dict({**micro_clip.space.to_dict(), "fingerprint": "0" * 16, "name": "other"})
    with pytest.raises(ValueError, match=r"prior was trained in embedding space micro .* but decoder in other"):
        micro_clip.space.check_same(other, "prior", "decoder")
    micro_clip.space.check_same(EmbeddingSpace.from_dict(micro_clip.space.to_dict()), "a", "b")


def test_the_latest_pointer_is_written_atomically_and_read_in_one_place(micro_clip, tmp_path, monkeypatch):
    run = tmp_path / "run"
    path = save_run_checkpoint(run, micro_clip, stage="clip", space=micro_clip.space)  # a stage that trains nothing
    checkpoints = run / "checkpoints"
    assert path == checkpoints / "step-00000000" and read_latest(checkpoints) == path
    assert load_stage(run).path == path and load_stage(checkpoints).path == path
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000000"]  # no temporaries left

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr("unclip.checkpoint.os.replace", crash)
    with pytest.raises(OSError):
        write_latest(checkpoints, "step-00000007")
    monkeypatch.undo()
    assert read_latest(checkpoints) == path  # a crash while moving the pointer leaves the old one
    write_latest(checkpoints, "step-00000007")
    with pytest.raises(CheckpointError, match=r"latest points at .*step-00000007, which is not a complete checkpoint"):
        load_stage(run)


def test_a_checkpoint_that_does_not_exist_says_what_to_give_instead(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint {tmp_path / 'outputs/clip/default'} does not exist; give a stage checkpoint, or the run "
            "directory of a trained stage (train that stage first, e.g. python train/clip.py)")):
        load_stage(tmp_path / "outputs/clip/default")


def test_a_run_directory_whose_latest_names_a_missing_checkpoint_says_the_way_out(micro_clip, tmp_path):
    from unclip.checkpoint import save_run_checkpoint

    save_run_checkpoint(tmp_path / "run", micro_clip, stage="clip", space=micro_clip.space)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    latest.write_text("step-00000099")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{latest} points at {latest.parent / 'step-00000099'}, which is not a complete checkpoint; write the name "
            "of a complete checkpoint (a step-* directory beside it) into it, or give a checkpoint directory itself")):
        load_stage(tmp_path / "run")
    latest.write_text("step-00000000")
    assert load_stage(tmp_path / "run").path == latest.parent / "step-00000000"


def test_the_manifest_covers_the_config_and_space_a_load_reads(micro_clip, tmp_path):
    """Editing a stage's settings in config.json changed the images silently; deleting space.json skipped the
    embedding-space check; a manifest listing no files loaded unverified."""
    path = save_stage(tmp_path / "clip", micro_clip, stage="clip", space=micro_clip.space)
    original = {name: (path / name).read_bytes() for name in ("config.json", "space.json", MANIFEST)}
    config = json.loads(original["config.json"])
    config["model"]["embed_dim"] = config["model"].get("embed_dim", 32)  # same size, other bytes: a quiet edit
    (path / "config.json").write_text(json.dumps(config, indent=1))
    with pytest.raises(CheckpointError, match=rf"cannot load {path}, it is damaged: {path}/config.json is \d+ bytes "
                                              r"where \d+ were written \(truncated or replaced\)\. Use an intact copy"):
        load_stage(path)
    (path / "config.json").write_bytes(original["config.json"])
    (path / "space.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{path}/space.json is missing"):
        load_stage(path)
    (path / "space.json").write_bytes(original["space.json"])
    (path / MANIFEST).write_text(json.dumps({"format": 1, "files": {}}))
    with pytest.raises(CheckpointError, match=rf"{path}/{MANIFEST} is damaged \(ValueError: it lists no files\)"):
        load_stage(path)
    manifest = json.loads(original[MANIFEST])
    del manifest["files"]["space.json"]  # a space.json the manifest does not list: put there after saving
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"{path}/space.json is not in {MANIFEST} \(added or replaced since"):
        load_stage(path)
    (path / MANIFEST).write_bytes(original[MANIFEST])
    assert load_stage(path).space == micro_clip.space
    (path / MANIFEST).unlink()  # saved before manifests existed: loads unverified, as before
    assert load_stage(path).space == micro_clip.space
