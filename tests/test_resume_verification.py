"""A resume loads only what was saved: every file of a training checkpoint is checked against its manifest (sizes and
sha256) first; damaged random states need the user's consent to an inexact resume; older checkpoints still resume."""

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_trainer

from unclip.checkpoint import MANIFEST
from unclip.weights import CheckpointError

FIRST = "step-00000004"


def _trained(run_dir):
    make_trainer(run_dir, max_steps=4).fit()
    return run_dir / "checkpoints" / FIRST


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_model_file_is_refused_on_resume_even_with_the_ema_intact(tmp_path):
    checkpoint = _trained(tmp_path)
    _truncate(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"cannot resume from {checkpoint}: {checkpoint}/model.safetensors is "
                                              r"\d+ bytes where \d+ were written \(truncated or replaced\)\. Write an "
                                              r"earlier checkpoint's name into .*latest, or start over with "
                                              r"trainer.overwrite=true"):
        make_trainer(tmp_path, max_steps=8, resume=True).fit()


@pytest.mark.parametrize("damage", ["truncated", "missing", "edited", "foreign"])
def test_damaged_random_states_are_an_error_unless_an_inexact_resume_is_allowed(tmp_path, damage, capsys):
    checkpoint = _trained(tmp_path / "run")
    states = checkpoint / "trainer" / "random_states_0.pkl"
    if damage == "truncated":
        _truncate(states)
    elif damage == "missing":
        states.unlink()
    elif damage == "edited":  # one byte changed, the size the same
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
    else:  # another run's: a valid file
        make_trainer(tmp_path / "other", max_steps=4, seed=1).fit()
        states.write_bytes((tmp_path / "other" / "checkpoints" / FIRST / "trainer" / "random_states_0.pkl").read_bytes())
    changed = r"changed since it was written \(its sha256 differs\)"
    resized = r"\d+ bytes where \d+ were written \(truncated or replaced\)"
    problem = {"truncated": resized, "missing": "missing", "edited": changed, "foreign": f"({resized}|{changed})"}[damage]
    with pytest.raises(CheckpointError, match=rf"cannot resume exactly from {checkpoint}: {states} is {problem}\. .*"
                                              r"add trainer.allow_inexact_resume=true to accept that"):
        make_trainer(tmp_path / "run", max_steps=8, resume=True).fit()
    capsys.readouterr()
    result = make_trainer(tmp_path / "run", max_steps=8, resume=True, allow_inexact_resume=True).fit()
    assert result.step == 8
    assert f"warning: resuming inexactly (trainer.allow_inexact_resume=true): {states} is" in capsys.readouterr().out


def test_a_checkpoint_without_a_manifest_still_resumes_exactly_with_a_warning(tmp_path, capsys):
    make_trainer(tmp_path / "straight", max_steps=8).fit()
    checkpoint = _trained(tmp_path / "old")
    (checkpoint / MANIFEST).unlink()  # as written before checkpoints had one
    make_trainer(tmp_path / "old", max_steps=8, resume=True).fit()
    assert f"warning: {checkpoint} has no {MANIFEST} (written by an older version)" in capsys.readouterr().out
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-00000008" / "model.safetensors")
    resumed = load_file(tmp_path / "old" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_damaged_manifest_is_an_error_naming_it(tmp_path):
    checkpoint = _trained(tmp_path)
    (checkpoint / MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match=rf"{checkpoint / MANIFEST} is damaged .* cannot be verified"):
        make_trainer(tmp_path, max_steps=8, resume=True).fit()


def test_a_damaged_manifest_names_the_ways_out_and_deleting_it_resumes_unverified(tmp_path, capsys):
    checkpoint = _trained(tmp_path)
    manifest = checkpoint / MANIFEST
    manifest.write_text('{"files": [')
    with pytest.raises(CheckpointError) as refused:
        make_trainer(tmp_path, max_steps=8, resume=True).fit()
    assert str(refused.value).startswith(f"cannot resume from {checkpoint}: {manifest} is damaged (JSONDecodeError: ")
    assert str(refused.value).endswith(
        f"so the checkpoint cannot be verified; delete {manifest} to load its files unverified (as from a checkpoint "
        f"saved before manifests existed), or use an earlier checkpoint; write an earlier checkpoint's name into "
        f"{tmp_path / 'checkpoints' / 'latest'}, or start over with trainer.overwrite=true")
    manifest.unlink()
    assert make_trainer(tmp_path, max_steps=8, resume=True).fit().step == 8
    assert f"warning: {checkpoint} has no {MANIFEST}" in capsys.readouterr().out
