"""Output directories are owned by one run at a time, and a run replaces only what it wrote: two processes into one
directory, a run killed while holding one, re-running into a directory with other files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from PIL import Image
from stages import save_micro_pipeline
from test_training import make_trainer

from unclip.run_lock import LOCK_FILE, DirectoryInUseError, hold_directory

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _holder(directory):
    """A process holding ``directory`` (as a run would) until it is killed."""
    code = ("import sys, time; from unclip.run_lock import hold_directory\n"
            "with hold_directory(sys.argv[1], 'a test run'):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_directory_held_by_a_live_run_is_refused_naming_its_pid_and_a_killed_runs_lock_is_taken_over(tmp_path,
                                                                                                       capsys):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(DirectoryInUseError, match=rf"{tmp_path} is in use by process {holder.pid} on .*a test run"):
            with hold_directory(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the killed run
    with hold_directory(tmp_path, "the next run"):
        assert f"taking over the stale lock {tmp_path / LOCK_FILE} of process {holder.pid}" in capsys.readouterr().out
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with hold_directory(tmp_path):  # re-entrant within the process
            pass
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()  # removed on exit


def test_a_second_training_run_into_a_run_directory_in_use_is_refused_before_it_writes(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(DirectoryInUseError, match=rf"{tmp_path} is in use by process {holder.pid}"):
            make_trainer(tmp_path, max_steps=4).fit()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "log.jsonl").exists()
    make_trainer(tmp_path, max_steps=4).fit()  # the killed holder's lock does not block the next run
    assert not (tmp_path / LOCK_FILE).exists()


def _sample_args(stages, out, *extra):
    return [sys.executable, "train/sample.py", f"hydra.run.dir={out}", f"pipeline.clip={stages['clip']}",
            f"pipeline.prior={stages['prior']}", f"pipeline.decoder={stages['decoder']}",
            f"pipeline.upsamplers=[{stages['upsamplers'][0]}]", "pipeline.settings.prior_steps=2",
            "pipeline.settings.decoder_steps=2", "pipeline.settings.upsampler_steps=2", *extra]


def _sample(stages, out, *extra):
    return subprocess.run(_sample_args(stages, out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


def _listed(out):
    return [json.loads(line)["file"] for line in (out / "samples.jsonl").read_text().splitlines()]


def test_two_concurrent_sample_jobs_into_one_directory_one_refuses_the_others_output_intact(tmp_path):
    stages = save_micro_pipeline(tmp_path / "stages")
    out, prompts = tmp_path / "out", tmp_path / "prompts.fifo"
    os.mkfifo(prompts)  # the first job waits, holding the directory, until the test gives it its prompts
    first = subprocess.Popen(_sample_args(stages, out, "prompts=[]", f"prompts_file={prompts}",
                                          "num_images_per_prompt=2"),
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text():
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        second = _sample(stages, out, "prompts=[a blue square]", "num_images_per_prompt=3")
        assert second.returncode != 0
        assert f"{out.resolve()} is in use by process {first.pid}" in second.stderr, second.stderr[-2000:]
        with open(prompts, "w") as fifo:
            fifo.write("a red circle\na green square\n")
        _, stderr = first.communicate(timeout=600)
    finally:
        first.kill() if first.poll() is None else None
    assert first.returncode == 0, stderr[-2000:]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a green square"] * 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert json.loads((out / "metrics.json").read_text())["images"] == 4
    assert Image.open(out / "grid.png").width > 2 * 32
    assert not (out / LOCK_FILE).exists()


def test_sampling_into_a_used_directory_needs_overwrite_and_then_replaces_only_its_own_files(tmp_path):
    stages = save_micro_pipeline(tmp_path / "stages")
    out = tmp_path / "out"
    first = _sample(stages, out, "prompts=[a red circle,a blue square]", "num_images_per_prompt=2")
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "notes.txt").write_text("mine")
    (out / "images" / "favourite.png").write_bytes(b"mine too")
    before = {name: (out / name).read_bytes() for name in _listed(out)}

    again = _sample(stages, out, "prompts=[a green square]", "num_images_per_prompt=1")
    assert again.returncode != 0
    assert f"{out} is not empty (it holds grid.png, images, metrics.json, notes.txt, samples.jsonl); add " \
           "overwrite=true" in again.stderr, again.stderr[-2000:]
    assert {name: (out / name).read_bytes() for name in _listed(out)} == before  # nothing touched

    victim = tmp_path / "victim.png"  # symlinks planted where the new run writes: replaced, not written through
    victim.write_bytes(b"my drawing")
    for name in ("grid.png", "images/0000.png"):
        (out / name).unlink()
        (out / name).symlink_to(victim)
    replaced = _sample(stages, out, "prompts=[a green square]", "num_images_per_prompt=1", "overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert victim.read_bytes() == b"my drawing"
    assert not (out / "grid.png").is_symlink() and Image.open(out / "grid.png").width == 32 + 4
    assert not (out / "images" / "0000.png").is_symlink()
    assert _listed(out) == ["images/0000.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000.png", "favourite.png"]  # no stale images
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "metrics.json").read_text())["images"] == 1


@pytest.mark.parametrize("job", ["sample", "clip"])
def test_a_job_into_a_directory_another_run_holds_is_refused_before_hydra_writes_there(tmp_path, job):
    earlier = tmp_path / ".hydra" / "config.yaml"
    earlier.parent.mkdir()
    earlier.write_text("the holder's config")
    holder = _holder(tmp_path)
    try:
        proc = subprocess.run([sys.executable, f"train/{job}.py", f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: {tmp_path} is in use by process {holder.pid} on {os.uname().nodename} (a test run, since "
        f"{json.loads((tmp_path / LOCK_FILE).read_text())['since']}); wait for it to finish or choose another output "
        "directory (hydra.run.dir=...)")
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted([".hydra", "config.yaml", LOCK_FILE])
    assert earlier.read_text() == "the holder's config"


def _in_a_read_only_directory(command, directory):
    """``command`` run with ``directory`` read-only: unwritable to a user, a read-only mount (in a private mount
    namespace, gone when the command ends) for root, who may write anywhere else."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    mount = f"mount -t tmpfs -o ro tmpfs {directory} && exec \"$@\""
    return subprocess.run(["unshare", "--mount", "sh", "-c", mount, "sh", *command], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("inside", [False, True], ids=["the run directory", "its parent"])
def test_a_read_only_run_directory_is_an_error_naming_it_and_the_way_out(tmp_path, inside):
    read_only = tmp_path / "run"
    read_only.mkdir()
    run_dir = read_only / "sub" if inside else read_only
    proc = _in_a_read_only_directory([sys.executable, "train/clip.py", f"hydra.run.dir={run_dir}"], read_only)
    assert proc.returncode == 1
    verb = "create" if inside else "write to"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: cannot {verb} {run_dir} (Read-only file system); the run could not save its results there: choose a "
        "writable directory or fix its permissions; e.g. hydra.run.dir=<a writable directory>"
    ) or os.geteuid() != 0 and f"Error: cannot {verb} {run_dir} (Permission denied)" in proc.stderr, proc.stderr
    assert "Unable to configure handler" not in proc.stderr


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    """The report's reproduction: with .run.lock a symlink to victim.txt, train/sample.py truncated the victim, wrote
    the lock's JSON into it and unlinked the symlink at exit."""
    victim = tmp_path / "victim.txt"
    victim.write_text("my thesis")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    proc = subprocess.run([sys.executable, "train/sample.py", f"hydra.run.dir={run}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: {run / LOCK_FILE} is not a regular file (a symbolic link or other special file); the run's lock must "
        f"be its own file: remove {run / LOCK_FILE} and run again; e.g. hydra.run.dir=<a writable directory>")
    assert victim.read_text() == "my thesis" and (run / LOCK_FILE).is_symlink()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # Hydra wrote nothing there


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path):
    """Users delete "stale" locks: a second trainer.overwrite=true run then deleted a running job's checkpoints."""
    make_trainer(tmp_path, max_steps=4).fit()
    holder = _holder(tmp_path)
    try:
        (tmp_path / LOCK_FILE).unlink()
        with pytest.raises(DirectoryInUseError, match=rf"{tmp_path} is in use by another process \(its {LOCK_FILE} "
                                                      r"was deleted while that run goes on; the directory stays locked "
                                                      r"until that process ends\)"):
            make_trainer(tmp_path, max_steps=4, overwrite=True).fit()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "checkpoints" / "step-00000004").is_dir()  # the running job's checkpoints are kept
    make_trainer(tmp_path, max_steps=4, overwrite=True).fit()  # its death released the directory


@pytest.mark.parametrize("launch", ["a stray RANK", "a multirun"])
def test_a_job_launched_another_way_into_a_held_directory_is_refused_before_hydra_writes(tmp_path, launch):
    """A SLURM or MPI wrapper's RANK=3 around one process, or `-m`, skipped the lock taken before Hydra writes: the
    refused job rewrote the live run's .hydra/ first."""
    run = tmp_path / "run"
    earlier = run / ".hydra" / "config.yaml"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("the holder's config")
    holder = _holder(run)
    args, env = [f"hydra.run.dir={run}"], {**ENV, "RANK": "3", "WORLD_SIZE": "4"}
    if launch == "a multirun":
        args, env = ["-m", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=run", "trainer.max_steps=1,2"], ENV
    try:
        proc = subprocess.run([sys.executable, "train/clip.py", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 1
    assert f"Error: {run} is in use by process {holder.pid}" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert earlier.read_text() == "the holder's config"
    assert sorted(p.name for p in run.rglob("*")) == sorted([".hydra", "config.yaml", LOCK_FILE])


def test_a_multirun_holds_each_job_directory_and_writes_its_hydra_config(tmp_path):
    proc = subprocess.run([sys.executable, "train/clip.py", "-m", f"hydra.sweep.dir={tmp_path}", "clip=micro_vit",
                           "data.image_size=32", "trainer.max_steps=1,2", "trainer.progress=false",
                           "trainer.warmup_steps=0", "data.val.length=32", "data.heldout.length=16"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in (("0", 1), ("1", 2)):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["step"] == steps
        assert f"trainer.max_steps={steps}" in (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        assert "max_steps: " + str(steps) in (tmp_path / job / ".hydra" / "config.yaml").read_text()
        assert not (tmp_path / job / LOCK_FILE).exists()
        assert "[INFO]" in (tmp_path / job / "clip.log").read_text()  # the job log, opened once the job held its dir
    assert not (tmp_path / LOCK_FILE).exists()


def test_results_are_written_by_rename_so_a_planted_symlink_is_replaced_not_written_through(tmp_path):
    """On resume, a metrics.json, curves.png or log.jsonl that is a symlink to another file was written through."""
    from unclip.jobs import Job

    Job(run_dir=tmp_path, config={}).fit(make_trainer(tmp_path, max_steps=4))
    victims = {}
    for name in ("metrics.json", "curves.png", "log.jsonl"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("someone else's file")
        (tmp_path / name).unlink()
        (tmp_path / name).symlink_to(victims[name])
    Job(run_dir=tmp_path, config={}).fit(make_trainer(tmp_path, max_steps=8, resume=True))
    for name, victim in victims.items():
        assert victim.read_text() == "someone else's file"
        assert (tmp_path / name).is_file() and not (tmp_path / name).is_symlink()
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 8
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert oct((tmp_path / "metrics.json").stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_hydra_writes_no_config_or_log_through_a_symlink_planted_in_the_run_directory(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("my thesis")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").symlink_to(victim)
    (run / "sample.log").symlink_to(victim)
    proc = subprocess.run([sys.executable, "train/sample.py", f"hydra.run.dir={run}", "prompts=[]"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "mode=generate needs prompts" in proc.stderr, proc.stderr[-2000:]
    assert victim.read_text() == "my thesis"
    assert "prompts: []" in (run / ".hydra" / "config.yaml").read_text()
    assert not (run / ".hydra" / "config.yaml").is_symlink() and not (run / "sample.log").is_symlink()
