"""The benchmarks' --quick paths run and end with one JSON line a script can read, with and without DALLE2-pytorch
(where it is installed), and their bad flags end in one clear sentence, never a traceback.

The reference is looked for in $UNCLIP_REFERENCE_DIR, else <repository>/.ref (install it there with the pip
command in bench/prior.py's docstring)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

BENCH = ROOT / "bench"
REFERENCE_DIR = Path(os.environ.get("UNCLIP_REFERENCE_DIR", ROOT / ".ref"))
needs_reference = pytest.mark.skipif(
    not (REFERENCE_DIR / "dalle2_pytorch").is_dir(),
    reason=f"DALLE2-pytorch 1.15.6 is not installed in {REFERENCE_DIR} (an optional external package; see "
           "bench/prior.py's docstring, or set UNCLIP_REFERENCE_DIR)")
TINY_PRIOR = ["--width", "64", "--embed-dim", "64", "--token-dim", "64", "--heads", "2", "--depth", "2"]
TINY_DECODER = ["--image-size", "16", "--base-channels", "32", "--channel-mult", "1", "2", "--res-blocks", "1",
                "--attention", "8", "--embed-dim", "64"]


def run(script: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCH / script), *flags], capture_output=True, text=True, env=env,
                          timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_run(run: dict, batch: int, workers: set, sampled: bool, ours: str = "bf16") -> None:
    assert run["batch"] == batch and set(run["results"]) == workers
    for name, result in run["results"].items():
        assert result["train_flops"] > 0 and result["step_s"] > 0, name
        assert len(result["losses"]) == 3  # --quick: 1 warm-up + 2 timed steps
    assert ("sample_guided_s" in run["results"][ours]) == sampled
    assert run["default_precision"] in ("bf16", "fp32")


def test_prior_quick_runs_and_ends_with_its_json():
    out = last_json(run("prior.py", "--quick", "--threads", "1", "--device", "cpu", *TINY_PRIOR, "--batch", "4"))
    assert out["benchmark"] == "prior" and out["config"]["batches"] == [4] and out["config"]["reference"] is None
    check_run(out["runs"][0], 4, {"bf16", "fp32"}, sampled=True)
    result = out["runs"][0]["results"]["bf16"]
    assert result["sample_guided_flops_per_step"] > 0 and result["sample_guided_flops"] > 0
    assert all(g["verdict"] in ("n/a", "not comparable (settings differ from the goal's)") for g in out["goals"])


def test_decoder_quick_measures_every_batch_size_and_samples_once():
    proc = run("decoder.py", "--quick", "--threads", "1", *TINY_DECODER, "--batch", "2", "3", "--precisions", "bf16",
               "--peak-tflops", "1")
    out = last_json(proc)
    assert out["benchmark"] == "decoder" and [r["batch"] for r in out["runs"]] == [2, 3]
    check_run(out["runs"][0], 2, {"bf16"}, sampled=True)
    check_run(out["runs"][1], 3, {"bf16"}, sampled=False)
    assert out["config"]["peak"]["bf16"] == 1.0
    assert re.search(r"train MFU \(%\) +[0-9.]+", proc.stdout)  # against the given peak


@needs_reference
@pytest.mark.slow
def test_prior_with_the_reference_measures_it_in_the_same_run_and_in_paired_rounds():
    out = last_json(run("prior.py", "--quick", "--threads", "1", *TINY_PRIOR, "--batch", "4", "--precisions", "fp32",
                        "--reference", str(REFERENCE_DIR)))
    run_ = out["runs"][0]
    check_run(run_, 4, {"fp32", "ref-fp32"}, sampled=True, ours="fp32")
    assert run_["results"]["ref-fp32"]["sample_guided_s"] > 0  # its sampling, in fp32
    paired = run_["paired"]
    assert f"ref-fp32/{paired['ours']}" in paired and len(paired["rounds"][paired["ours"]]) == 2
    assert any("median of the paired rounds" in g["description"] for g in out["goals"])
    assert out["config"]["reference"] == str(REFERENCE_DIR)  # a Path in the config is written as its text


@needs_reference
@pytest.mark.slow
def test_decoder_with_the_reference_ends_with_its_json():
    out = last_json(run("decoder.py", "--quick", "--threads", "1", *TINY_DECODER, "--batch", "2",
                        "--reference", str(REFERENCE_DIR), "--precisions", "bf16", "--no-sampling"))
    run_ = out["runs"][0]
    check_run(run_, 2, {"bf16", "ref-bf16"}, sampled=False)
    assert f"ref-bf16/{run_['paired']['ours']}" in run_["paired"]
    assert out["config"]["reference"] == str(REFERENCE_DIR)


@pytest.mark.slow
def test_generate_quick_times_text_to_image():
    out = last_json(run("generate.py", "--quick", "--threads", "1", "--device", "cpu"))
    assert out["benchmark"] == "generate" and out["seconds"]["auto"] > 0 and "off" not in out["seconds"]
    out = last_json(run("generate.py", "--quick", "--threads", "1", "--device", "cpu", "--settings",
                        "decoder_sampler=dpmpp_2m", "prior_sampler=dpmpp_2s", "decoder_steps=3"))
    assert out["config"]["settings"] == {"decoder_sampler": "dpmpp_2m", "prior_sampler": "dpmpp_2s", "decoder_steps": 3}
    assert out["goals"][0]["verdict"] == "not comparable (settings differ from the goal's)"


def test_checkpointing_quick_measures_each_model_without_and_with_it():
    proc = run("checkpointing.py", "--quick", "--threads", "1", "--device", "cpu", "--models", "dalle")
    out = last_json(proc)
    assert out["benchmark"] == "checkpointing" and [r["model"] for r in out["runs"]] == ["dalle"]
    for run_ in out["runs"]:
        off, on = run_["off"], run_["on"]
        assert off["checkpointed_layers"] == 0 and on["checkpointed_layers"] > 0
        assert on["first_loss"] == off["first_loss"]  # the same model, batch and draws: only the memory differs
        assert off["memory"]["tensor_peak_mb"] > 0 and on["step_s"] > 0 and run_["slowdown"] > 0
    assert re.search(r"peak tensor memory \(MemTracker, MB\) +[0-9.]+ +[0-9.]+ +[0-9.]+", proc.stdout)


def load_bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name, batches", [("prior", [32, 512]), ("decoder", [8, 64])])
def test_the_gpu_suite_names_issue_16s_batch_sizes(monkeypatch, name, batches):
    module = load_bench(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--suite", "gpu", "--device", "cpu"])
    assert module.arguments().batches == batches
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--batch", "2", "5", "--device", "cpu"])
    assert module.arguments().batches == [2, 5]


@pytest.mark.parametrize("flags, message", [
    (["--suite", "gpu", "--batch", "8"], r"--suite gpu sets the batch sizes \(\[32, 512\]\); drop --batch"),
    (["--peak-tflops", "fast"], "--peak-tflops: unknown peak 'fast': give a positive number of TFLOP/s"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows; use cpu, cuda or cuda:N"),
    (["--reference", "/nonexistent"], "--reference /nonexistent: no dalle2_pytorch package there"),
    (["--reference", "{fake}", "--width", "128"], "--width, --embed-dim and --token-dim must be equal"),
    (["--batch", "0"], r"--batch sizes must be >= 1, got \[0\]"),
])
def test_bad_flags_end_in_one_sentence(tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "dalle2_pytorch").mkdir()
    monkeypatch.setattr(sys, "argv", ["prior.py", *[f.format(fake=tmp_path) for f in flags]])
    with pytest.raises(SystemExit) as exit_:
        load_bench("prior").arguments()
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--models", "vae"], r"argument --models: invalid choice: 'vae' \(choose from '?decoder'?, '?upsampler'?"),
])
def test_checkpointing_bad_flags_end_in_one_sentence(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(sys, "argv", ["checkpointing.py", *flags])
    with pytest.raises(SystemExit) as exit_:
        load_bench("checkpointing").arguments()
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script", ["prior.py", "decoder.py"])
def test_cuda_without_a_gpu_is_a_clear_error(script):
    proc = run(script, "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--device cuda: torch sees no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr


def test_editing_quick_measures_every_edit_and_keeps_the_unmasked_pixels(tmp_path):
    from stages import save_micro_pipeline

    from unclip.checkpoint import load_stage, save_stage
    from unclip.decoder.inpainting import inpainting_decoder_from
    from unclip.pipelines import UnCLIPPipeline

    stages = save_micro_pipeline(tmp_path)
    UnCLIPPipeline.from_pretrained(**stages, device="cpu").save_pretrained(tmp_path / "pipeline")
    decoder = load_stage(stages["decoder"], stage="decoder")
    save_stage(tmp_path / "inpainter", inpainting_decoder_from(decoder.model), stage="decoder", space=decoder.space)
    out = last_json(run("editing.py", str(tmp_path / "pipeline"), "--quick", "--threads", "1", "--device", "cpu",
                        "--inpainting-decoder", str(tmp_path / "inpainter"), "--out", str(tmp_path / "out")))
    metrics = out["metrics"]
    for variant in ("inpainting decoder", "repaint j=0", "repaint j=3"):
        for part in ("replace", "remove"):
            assert 0 <= metrics[f"{part}_success[{variant}]"] <= 1
            assert metrics[f"{part}_outside_max_abs_diff_255[{variant}]"] <= 2  # issue 14: kept exactly
    assert {f"img2img_follows_prompt[{s:g}]" for s in (0.2, 0.4, 0.6, 0.8, 1.0)} <= set(metrics)
    assert {"mix_blue_square[text weight 0.5]", "negative_red_circles[with 'red']"} <= set(metrics)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"] == metrics
    assert {"replace_inpainting_decoder.png", "img2img.png", "mix.png", "negative_red.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()}


def test_editing_bad_flags_end_in_one_sentence(tmp_path):
    proc = run("editing.py", str(tmp_path), "--quick")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path} is not a saved pipeline (no pipeline.json)" in proc.stderr


def test_samplers_quick_measures_every_stage_sampler_and_spacing(tmp_path):
    from stages import save_micro_pipeline

    from unclip.pipelines import GenerationSettings, UnCLIPPipeline

    pipe = UnCLIPPipeline.from_pretrained(**save_micro_pipeline(tmp_path / "stages"), device="cpu")
    pipe.settings = GenerationSettings(prior_steps=2, decoder_steps=2, upsampler_steps=2)
    pipe.save_pretrained(tmp_path / "pipeline")
    out = last_json(run("samplers.py", str(tmp_path / "pipeline"), "--quick", "--threads", "1", "--samplers",
                        "dpmpp_2m", "dpmpp_2s"))
    assert out["benchmark"] == "samplers" and out["config"]["items"] == 2 and out["config"]["steps"] == [4]
    rows = {(row["stage"], row["sampler"], row["spacing"]): row for row in out["rows"]}
    assert set(rows) == {(stage, sampler, spacing) for stage in ("decoder", "prior", "upsampler_0")
                         for sampler in ("dpmpp_2m", "dpmpp_2s") for spacing in ("uniform", "karras")}
    for (stage, *_), row in rows.items():
        assert row["steps"] == 4 and row["seconds_per_image"] > 0
        if stage == "upsampler_0":
            assert row["psnr"] > 0 and "psnr_gain_db" in row
        else:
            assert all(0 <= row[split] <= 1 for split in ("val", "heldout", "pair"))


@pytest.mark.parametrize("flags, message", [
    (["--samplers", "dpmpp_2m", "--steps", "1", "4"], "--steps 1 with --samplers dpmpp_2m: dpmpp_2m is a "
                                                      "second-order solver and needs steps >= 2, got steps=1"),
    (["--spacings", "cosine"], r"argument --spacings: invalid choice: 'cosine' \(choose from '?uniform'?"),
    (["--items", "0"], r"--items, --steps, --rerank and --fixed-decoder-steps must be >= 1, got 0"),
])
def test_samplers_bad_flags_end_in_one_sentence(tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "pipeline.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["samplers.py", str(tmp_path), *flags])
    with pytest.raises(SystemExit) as exit_:
        load_bench("samplers").arguments()
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
    monkeypatch.setattr(sys, "argv", ["samplers.py", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        load_bench("samplers").arguments()
    assert "none is not a saved pipeline (no pipeline.json)" in capsys.readouterr().err


def test_clip_training_quick_times_both_attention_kernels():
    out = last_json(run("clip_training.py", "--quick", "--threads", "1"))
    assert out["batch"] == 8 and out["precision"] in ("bf16", "fp32")
    for kernel in ("math", "sdpa"):
        assert out[kernel]["step_s"] > 0 and out[kernel]["backward_s"] > 0
    assert out["math_over_sdpa"] > 0
