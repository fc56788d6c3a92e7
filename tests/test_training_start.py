"""What a training run checks before it trains, and how it starts over: an unwritable checkpoint directory stops it
at once; trainer.overwrite=true always gets the user out (a dangling `latest` too) and starts a fresh log.jsonl; a
restart never leaves a step in log.jsonl twice."""

import json

import pytest
from test_training import make_trainer

from unclip.weights import CheckpointError


def _logged_steps(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_a_checkpoint_directory_that_cannot_be_written_stops_the_run_before_it_trains(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints would go")
    trainer = make_trainer(tmp_path, max_steps=4)
    with pytest.raises(PermissionError, match=rf"cannot write checkpoints to {tmp_path / 'checkpoints'} \(.*\); the "
                                              r"steps trained would be lost: .*hydra.run.dir=\.\.\."):
        trainer.fit()
    assert trainer.step == 0 and not (tmp_path / "log.jsonl").exists()


def test_overwrite_gets_out_of_a_dangling_latest_and_starts_a_fresh_log(tmp_path):
    make_trainer(tmp_path, max_steps=8).fit()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099")  # names a checkpoint that is gone
    with pytest.raises(CheckpointError, match=r"points at .*step-00000099, which is not a complete training "
                                              r"checkpoint; write the name of a complete checkpoint into it, or "
                                              r"start over with trainer.overwrite=true"):
        make_trainer(tmp_path, max_steps=4).fit()
    make_trainer(tmp_path, max_steps=4, overwrite=True).fit()
    assert _logged_steps(tmp_path) == [2, 4]  # the earlier run's steps 2..8 are gone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000004"]


def test_a_restart_after_a_crash_logs_every_step_once(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_step_7(model, calls=[]):
        calls.append(1)
        if len(calls) == 7:
            raise Crash

    crashing = make_trainer(tmp_path, max_steps=12)  # checkpoints at 4 and 8, logs every 2 steps
    crashing.after_step_fn = crash_at_step_7
    with pytest.raises(Crash):
        crashing.fit()
    assert _logged_steps(tmp_path) == [2, 4, 6]  # step 6 is after the last checkpoint: it is trained again
    make_trainer(tmp_path, max_steps=12, resume=True).fit()
    assert _logged_steps(tmp_path) == [2, 4, 6, 8, 10, 12]


def test_a_restart_before_the_first_checkpoint_starts_a_fresh_log(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_step_3(model, calls=[]):
        calls.append(1)
        if len(calls) == 3:
            raise Crash

    crashing = make_trainer(tmp_path, max_steps=8)
    crashing.after_step_fn = crash_at_step_3
    with pytest.raises(Crash):
        crashing.fit()
    assert _logged_steps(tmp_path) == [2] and not (tmp_path / "checkpoints" / "latest").exists()
    make_trainer(tmp_path, max_steps=8).fit()
    assert _logged_steps(tmp_path) == [2, 4, 6, 8]
