"""What the benchmarks share: flags, precision, the timed training loop, FLOPs and MFU, peak memory, workers, the
report.

Each measurement runs in a fresh process (``--worker bf16`` / ``fp32`` for ours, ``ref-bf16`` / ``ref-fp32`` for
DALLE2-pytorch with ``--reference DIR``, ``paired`` for the alternated rounds) started by the script itself: on the
CPU the only exact peak-memory measure is the process's peak RSS (``ru_maxrss``; psutil sees the current RSS
only), so measurements must not share a process. A worker prints its numbers as one JSON line; the parent prints a
table per batch size and ends with one JSON line of everything.

``--batch`` takes several sizes, and ``--suite gpu`` names the sizes issue 16 measures on a GPU; every size is
measured with every worker (sampling, which does not depend on the training batch, at the first size only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from ema_pytorch import EMA

from unclip.flops import PEAKS, count_flops, device_peak, mfu, parse_peak
from unclip.training.config import TrainerConfig
from unclip.training.precision import choose_mixed_precision
from unclip.training.trainer import make_optimizer

PRECISIONS = ("bf16", "fp32")
REFERENCE = "DALLE2-pytorch 1.15.6"
REF = "ref-"  # a reference worker is REF + precision: DALLE2-pytorch measured in this run
PAIRED = "paired"  # the worker that alternates our default precision's steps with the reference's
SUITES = ("gpu",)


# -- flags --------------------------------------------------------------------------------------------
def parser(description: str, *, steps: int, warmup: int, batch: int, sample_runs: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch", type=int, nargs="+", default=[batch], help="training batch size(s), one report each")
    p.add_argument("--suite", choices=SUITES, default=None,
                   help="gpu: the batch sizes issue 16 measures on a GPU, each with the reference where given")
    p.add_argument("--steps", type=int, default=steps, help="timed training steps per precision")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed training steps before them")
    p.add_argument("--sample-steps", type=int, default=64, help="DDIM steps when sampling")
    p.add_argument("--sample-runs", type=int, default=sample_runs, help="timed sampling runs (median)")
    p.add_argument("--no-sampling", action="store_true", help="measure training only")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--ema", action="store_true", help="also update an EMA copy every step, as the Trainer does")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one training step")
    p.add_argument("--peak-tflops", default=None, metavar="PEAK",
                   help=f"the device's peak for the MFU: TFLOP/s (every precision) or one of {', '.join(PEAKS)} "
                        "(default: from the GPU's name; unknown on the CPU)")
    p.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help=f"also measure {REFERENCE}, installed in DIR (see the script's docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one thing in this process
    return p


def parse(p: argparse.ArgumentParser, suite_batches: dict[str, list[int]]) -> argparse.Namespace:
    """Parse and check the flags; every bad value ends in ``p.error`` (a usage line and one sentence)."""
    explicit_batch = any(a == "--batch" or a.startswith("--batch=") for a in sys.argv[1:])
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.sample_steps, args.sample_runs = 2, 1, 4, 1
    for name, low in (("steps", 1), ("warmup", 0), ("sample_steps", 1), ("sample_runs", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        p.error(f"--batch sizes must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.device = parse_device(p, args.device)
    args.peak = _peak(p, args.peak_tflops, args.device)
    if args.reference is not None and not (args.reference / "dalle2_pytorch").is_dir():
        p.error(f"--reference {args.reference}: no dalle2_pytorch package there; install it with the command in "
                "this script's docstring")
    if args.worker is None:
        if args.suite and explicit_batch:
            p.error(f"--suite {args.suite} sets the batch sizes ({suite_batches[args.suite]}); drop --batch")
        args.batches = suite_batches[args.suite] if args.suite else list(args.batch)
    else:
        args.batch = args.batch[-1]  # the parent appends the one size this worker measures
    return args


def parse_device(p: argparse.ArgumentParser, name: str | None) -> torch.device:
    """``--device``: cpu or cuda[:N], where torch sees it (else ``p.error``); None: cuda if available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        p.error(f"--device {name!r} is not a device torch knows; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            p.error(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}, {built}); run on the "
                    "CPU with --device cpu, or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif device.type != "cpu":
        p.error(f"--device {name}: the benchmarks run on cpu or cuda")
    return device


def _peak(p: argparse.ArgumentParser, value: str | None, device: torch.device):
    if value is None:
        return device_peak(device)
    try:
        return parse_peak(value)
    except ValueError as err:
        p.error(f"--peak-tflops: {err}")


def setting(args: argparse.Namespace) -> str:
    """The run's device, threads, counts and peak, for the report's header."""
    device = str(args.device) + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    peak = (f"MFU against {args.peak.name}: bf16 {args.peak.tflops('bf16'):g}, fp32 {args.peak.tflops('fp32'):g} "
            "TFLOP/s" if args.peak else "MFU: peak unknown (give --peak-tflops)")
    sampling = ("no sampling" if args.no_sampling else
                f"sampling: median of {args.sample_runs} run(s) of {args.sample_steps} DDIM steps")
    return (f"{device}, threads {torch.get_num_threads()}, torch {torch.__version__}; {args.steps} timed training "
            f"steps after {args.warmup} warm-up and 1 counted{', with EMA' if args.ema else ''}; {sampling}; {peak}")


# -- measuring ----------------------------------------------------------------------------------------
def autocast(device: torch.device, precision: str):
    """bf16 autocast (as accelerate applies it) or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def default_precision(device: torch.device, step_flops: float) -> str:
    """The precision ``trainer.mixed_precision=auto`` picks for a step of ``step_flops`` on ``device``."""
    precision, _ = choose_mixed_precision(device.type, lambda: step_flops)
    return "bf16" if precision == "bf16" else "fp32"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


class PeakMemory:
    """Peak memory from construction to ``result()``, in MB.

    CUDA: ``max_memory_allocated`` (``peak_mb``) and its growth over what was allocated at construction.
    CPU: the process's peak RSS (``ru_maxrss``: model, data, torch's own libraries, everything) and its growth
    over the peak RSS at construction; meaningful only in a process that measures one thing.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.baseline = self._max_rss_mb()

    @staticmethod
    def _max_rss_mb() -> float:
        kilobytes_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kilobytes_or_bytes / (2**20 if sys.platform == "darwin" else 2**10)

    def result(self) -> dict:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = self._max_rss_mb()
        return {"peak_mb": peak, "growth_mb": peak - self.baseline}


def train_step(model: torch.nn.Module, loss_fn: Callable, args, precision: str) -> Callable[[dict], tuple]:
    """One optimizer step as the Trainer takes it: ``step(batch) -> (loss, [forward_s, backward_s, optimizer_s])``.

    AdamW with the Trainer's defaults and parameter groups; the loss ``loss_fn(model, batch)["loss"]`` under
    autocast, backward outside it, gradient clipping, the step (and the EMA update with ``--ema``).
    """
    cfg, device = TrainerConfig(), args.device
    model.train()
    optimizer = make_optimizer(model, cfg)
    ema = None
    if args.ema:
        no_ema = {name for name, _ in model.named_buffers()}  # as the Trainer: buffers are copied
        ema = EMA(model, beta=cfg.ema_beta, update_after_step=0, param_or_buffer_names_no_ema=no_ema,
                  use_foreach=True).to(device)

    def step(batch: dict) -> tuple[torch.Tensor, list[float]]:
        start = now(device)
        with autocast(device, precision):
            loss = loss_fn(model, batch)["loss"]
        forward = now(device)
        loss.backward()
        backward = now(device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        done = now(device)
        return loss.detach(), [forward - start, backward - forward, done - backward]

    return step


def train(model: torch.nn.Module, loss_fn: Callable, make_batch: Callable[[int], dict], args, precision: str) -> dict:
    """One counted step, then ``args.warmup + args.steps`` steps of ``train_step``.

    The first step runs under a FLOP counter (``train_flops``: forward and backward of one step) and is not
    timed. ``make_batch(i)`` builds step i's batch outside the timed region. Returns the median seconds of each
    phase over the timed steps, every step's loss, the peak memory of the whole loop and, with ``--profile``, a
    table of the top ops of one extra step.
    """
    device = args.device
    step = train_step(model, loss_fn, args, precision)
    _, flops = count_flops(lambda: step(make_batch(-3)))

    memory = PeakMemory(device)
    phases, losses = [], []
    for i in range(args.warmup + args.steps):
        loss, seconds = step(make_batch(i))
        losses.append(loss.item())
        if i >= args.warmup:
            phases.append(seconds)
        print(f"  {precision} step {i + 1}/{args.warmup + args.steps}: {sum(seconds):.3f} s, loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
    result = {"memory": memory.result(), "losses": losses, "train_flops": flops}
    for name, column in zip(("forward_s", "backward_s", "optimizer_s"), zip(*phases)):
        result[name] = statistics.median(column)
    result["step_s"] = statistics.median(sum(seconds) for seconds in phases)

    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            step(make_batch(args.warmup + args.steps))
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        result["profile"] = profiler.key_averages().table(sort_by=sort, row_limit=15)
    return result


def paired(steps: dict[str, Callable[[dict], tuple]], make_batch: Callable[[int], dict], args) -> dict:
    """Alternate training steps of several models in one process, so that a slow spell of the machine slows
    all of them alike: ``args.warmup`` untimed rounds, then ``args.steps`` timed rounds, the order rotating
    every round. Returns each model's median step seconds and, for every pair, the median per-round ratio."""
    names, seconds = list(steps), {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        batch = make_batch(i)
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            _, phases = steps[name](batch)
            if i >= args.warmup:
                seconds[name].append(sum(phases))
        if i >= args.warmup:
            print("  round " + ", ".join(f"{n} {seconds[n][-1]:.3f} s" for n in names), file=sys.stderr, flush=True)
    result = {f"{name}_step_s": statistics.median(seconds[name]) for name in names}
    for a in names:
        for b in names:
            if a < b:
                result[f"{b}/{a}"] = statistics.median(y / x for x, y in zip(seconds[a], seconds[b]))
    result["rounds"] = seconds
    return result


def paired_worker(ours: torch.nn.Module, our_loss: Callable, build_reference: Callable, make_batch, args) -> dict:
    """The ``paired`` measurement: our model at its default precision (as ``auto`` decides from a counted step)
    and the reference in each of ``args.precisions``, their steps alternated in one process."""
    probe = train_step(ours, our_loss, args, "fp32")
    _, flops = count_flops(lambda: probe(make_batch(-3)))
    mine = default_precision(args.device, flops)
    steps = {mine: train_step(ours, our_loss, args, mine)}
    for precision in args.precisions:
        model, loss = build_reference(args)
        steps[REF + precision] = train_step(model, loss, args, precision)
    return {"ours": mine, **paired(steps, make_batch, args)}


def latency(fn: Callable[[int], object], args) -> float:
    """Median seconds of ``fn(args.sample_steps)`` over ``args.sample_runs`` runs, after a 2-step warm-up."""
    fn(min(2, args.sample_steps))
    seconds = []
    for _ in range(args.sample_runs):
        start = now(args.device)
        fn(args.sample_steps)
        seconds.append(now(args.device) - start)
    return statistics.median(seconds)


def sampling(sample: Callable[..., object], args, guidance: float) -> dict:
    """Latency of ``sample(steps, scale, cuda_graphs)`` unguided and guided, and its FLOPs per step (counted
    eagerly on 1 and 2 steps, so that once-per-run work such as the prior's prefix cancels). On CUDA the guided
    run is also timed without CUDA graphs (``sample_guided_eager_s``)."""
    result = {
        "sample_s": latency(lambda steps: sample(steps, 1.0, "auto"), args),
        "sample_guided_s": latency(lambda steps: sample(steps, guidance, "auto"), args),
    }
    if args.device.type == "cuda":
        result["sample_guided_eager_s"] = latency(lambda steps: sample(steps, guidance, "off"), args)
    _, one = count_flops(lambda: sample(1, guidance, "off"))
    _, two = count_flops(lambda: sample(2, guidance, "off"))
    result["sample_guided_flops_per_step"] = two - one
    result["sample_guided_flops"] = one + (args.sample_steps - 1) * (two - one)
    return result


# -- processes ----------------------------------------------------------------------------------------
def workers_for(args) -> list[str]:
    """Ours in each precision, then, with ``--reference``, the reference in each and the paired rounds."""
    names = list(args.precisions)
    if args.reference is not None:
        names += [REF + p for p in args.precisions] + [PAIRED]
    return names


def run_workers(script: str, args, workers: list[str], extra: list[str] = ()) -> dict[str, dict]:
    """Run ``script`` once per name in ``workers`` in a fresh process (with ``extra`` flags); echo its output
    and collect its JSON line."""
    results = {}
    for name in workers:
        print(f"measuring {name} in a fresh process ...", file=sys.stderr, flush=True)
        argv = [sys.executable, script, *sys.argv[1:], *extra, "--worker", name]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.rstrip("\n").splitlines()
        if proc.returncode or not lines:
            sys.exit(f"the {name} worker failed (exit code {proc.returncode}): {' '.join(argv)}")
        *text, last = lines
        if text:
            print("\n".join(text))
        results[name] = json.loads(last)
    return results


def run_batches(script: str, args) -> list[tuple[int, dict]]:
    """Every worker at every batch size of ``args.batches``; sampling at the first size only."""
    runs = []
    for i, batch in enumerate(args.batches):
        extra = ["--batch", str(batch)] + (["--no-sampling"] if i > 0 else [])
        print(f"batch {batch} ({i + 1} of {len(args.batches)})", file=sys.stderr, flush=True)
        runs.append((batch, run_workers(script, args, workers_for(args), extra)))
    return runs


def reference_package(args):
    """DALLE2-pytorch (1.15.6, the version the goals were measured against) from ``args.reference``."""
    sys.path.insert(0, str(args.reference))
    os.environ.setdefault("TQDM_DISABLE", "1")  # its sampling loop draws a progress bar per call
    import dalle2_pytorch

    if dalle2_pytorch.__version__ != "1.15.6":
        print(f"warning: {args.reference} holds dalle2_pytorch {dalle2_pytorch.__version__}, not 1.15.6",
              file=sys.stderr)
    return dalle2_pytorch


def measure(model: torch.nn.Module, loss_fn: Callable, make_batch: Callable[[int], dict], args, precision: str,
            sampler: Callable[[], Callable[..., object]] | None, counted: torch.nn.Module) -> dict:
    """A worker's numbers: ``model`` trained with ``loss_fn``, then (given a ``sampler``, which prepares the trained
    model and returns ``sample(steps, scale, graphs)``) its sampling timed; the parameters of ``counted``."""
    result = train(model, loss_fn, make_batch, args, precision)
    if sampler is not None:
        result.update(sampling(sampler(), args, args.guidance))
    result["parameters"] = sum(p.numel() for p in counted.parameters())
    return result


def worker(args, *, ours: Callable, reference: Callable, paired: Callable) -> None:
    """Measure ``args.worker`` in this process (``ours(args, precision)``, ``reference(args, precision)`` or the
    ``paired(args)`` comparison); print its numbers as one JSON line."""
    name = args.worker
    if name == PAIRED:
        result = paired(args)
    elif name.startswith(REF):
        result = reference(args, name[len(REF):])
    else:
        result = ours(args, name)
    if "profile" in result:
        print(f"top ops of one {name} training step:\n{result.pop('profile')}")
    print(json.dumps(result))


def main(benchmark: str, script: str, args, report: Callable, reference_numbers: dict, *, ours: Callable,
         reference: Callable, build: Callable, loss: Callable, build_reference: Callable, batches: Callable) -> None:
    """A benchmark's run: as a worker, one measurement (see ``worker``; the paired one trains ``build(args)`` with
    ``loss`` and ``build_reference(args)`` on ``batches(args)``); else a worker per precision and batch size, a
    report per batch size, and the JSON of them all."""
    if args.worker:
        def paired(args):
            return paired_worker(build(args), loss, build_reference, batches(args), args)

        return worker(args, ours=ours, reference=reference, paired=paired)
    runs = [report(args, batch, results) for batch, results in run_batches(script, args)]
    print_json(benchmark, args, runs=runs, reference=reference_numbers, goals=[g for run in runs for g in run["goals"]])


# -- the report ---------------------------------------------------------------------------------------
def report_columns(results: dict) -> tuple[dict | None, list[str], list[str], int]:
    """Of one batch size's results: the paired comparison (taken out), the columns, ours among them, and the
    model's parameters."""
    pair = results.pop(PAIRED, None)
    columns = list(results)
    ours = [c for c in columns if c in PRECISIONS]
    return pair, columns, ours, results[ours[0] if ours else columns[0]]["parameters"]


def print_setting(args) -> None:
    print(setting(args))
    if args.quick:
        print("quick run: the counts are too small for any number below to mean anything")


def training_rows(results: dict, columns, args, batch: int, reference: dict, reference_speed: float | None,
                  reference_step: float | None) -> list[tuple[str, dict, object]]:
    """The training rows every benchmark reports: speed, step time and its phases, memory, throughput."""
    def col(f) -> dict:
        return {c: f(results[c]) for c in columns if c in results}

    return [
        ("train samples/s", col(lambda r: batch / r["step_s"]), reference_speed),
        ("train step, median (s)", col(lambda r: r["step_s"]), reference_step),
        ("  forward (s)", col(lambda r: r["forward_s"]), None),
        ("  backward (s)", col(lambda r: r["backward_s"]), None),
        ("  grad clip + AdamW" + (" + EMA" if args.ema else "") + " (s)", col(lambda r: r["optimizer_s"]), None),
        ("  forward / backward / optimizer (%)",
         col(lambda r: "/".join(f"{100 * r[k] / r['step_s']:.0f}" for k in ("forward_s", "backward_s", "optimizer_s"))),
         None),
        (f"peak memory ({'allocated' if args.device.type == 'cuda' else 'process RSS'}, MB)",
         col(lambda r: r["memory"]["peak_mb"]), reference["train_peak_mb"]),
        ("  growth while training (MB)", col(lambda r: r["memory"]["growth_mb"]), None),
        *throughput_rows(results, args, batch),
    ]


def table(rows: list[tuple[str, dict, object]], columns, fmt: str = "{:.2f}", last: str | None = None) -> None:
    """Print rows of (label, {column: value}, value of the ``last`` column or None) as aligned columns."""
    def cell(value) -> str:
        return "-" if value is None else fmt.format(value) if isinstance(value, (int, float)) else str(value)

    tail = f"   {last}" if last else ""
    print(f"{'':<44}" + "".join(f"{c:>12}" for c in columns) + tail)
    for label, values, extra in rows:
        print(f"{label:<44}" + "".join(f"{cell(values.get(c)):>12}" for c in columns)
              + (f"   {cell(extra)}" if last else ""))


def throughput_rows(results: dict, args, batch: int) -> list[tuple[str, dict, object]]:
    """FLOPs, achieved TFLOP/s and MFU of each worker's training step and guided sampling."""
    def precision_of(name: str) -> str:
        return name[len(REF):] if name.startswith(REF) else name

    def fraction(name: str, flops: float | None, seconds: float | None):
        if flops is None or seconds is None or args.peak is None:
            return None
        return 100 * mfu(flops, seconds, args.peak.tflops(precision_of(name)))

    train = {n: r for n, r in results.items() if "train_flops" in r}
    rows = [
        ("train TFLOP a step (counted)", {n: r["train_flops"] / 1e12 for n, r in train.items()}, None),
        ("train TFLOP/s", {n: r["train_flops"] / r["step_s"] / 1e12 for n, r in train.items()}, None),
        ("train MFU (%)", {n: fraction(n, r["train_flops"], r["step_s"]) for n, r in train.items()}, None),
    ]
    guided = {n: r for n, r in results.items() if "sample_guided_flops" in r}
    if guided:
        rows += [
            ("guided sampling GFLOP a step", {n: r["sample_guided_flops_per_step"] / 1e9 for n, r in guided.items()},
             None),
            ("guided sampling MFU (%)",
             {n: fraction(n, r["sample_guided_flops"], r["sample_guided_s"]) for n, r in guided.items()}, None),
        ]
    return rows


def sampling_rows(results: dict, columns, what: str, args, reference: dict) -> list[tuple[str, dict, object]]:
    """The sampling latency rows (plain, guided, guided without CUDA graphs) of the columns that sampled;
    ``what`` names one sample ("1 image"), ``reference`` holds the reference's sample_s / sample_guided_s."""
    sampled = [c for c in columns if "sample_s" in results.get(c, {})]
    if not sampled:
        return []
    return [
        (f"sample {what}, {args.sample_steps} DDIM (s)", {c: results[c]["sample_s"] for c in sampled},
         reference["sample_s"]),
        (f"  with guidance {args.guidance:g} (s)", {c: results[c]["sample_guided_s"] for c in sampled},
         reference["sample_guided_s"]),
        ("  with guidance, without CUDA graphs (s)", {c: results[c].get("sample_guided_eager_s") for c in sampled},
         None),
    ]


def goal(description: str, value: float | None, target: float, at_least: bool, comparable: bool = True) -> dict:
    """Print one goal line; return it for the JSON."""
    if value is None or not comparable:
        verdict = "n/a" if value is None else "not comparable (settings differ from the goal's)"
    else:
        verdict = "met" if (value >= target if at_least else value <= target) else "not met"
    shown = "-" if value is None else f"{value:.2f}"
    print(f"goal: {description} {'>=' if at_least else '<='} {target:.2f}: {shown} -> {verdict}")
    return {"description": description, "target": target, "value": value, "verdict": verdict}


def default_goals(results: dict, args, batch: int) -> tuple[str | None, list[dict]]:
    """Our default precision (as ``auto`` picks it from the counted step) and the goal that it is not slower than
    the other precision (within 3%, the noise of one run)."""
    ours = [p for p in PRECISIONS if p in results]
    if not ours:
        return None, []
    default = default_precision(args.device, results[ours[0]]["train_flops"])
    others = [p for p in ours if p != default]
    print(f"default precision (trainer.mixed_precision=auto) at batch {batch} on {args.device.type}: {default}")
    if default not in results or not others:
        return default, []
    ratio = results[others[0]]["step_s"] / results[default]["step_s"]
    return default, [goal(f"batch {batch}: {others[0]} step time / the default {default}'s", ratio, 0.97,
                          at_least=True, comparable=not args.quick)]


def reference_goals(results: dict, pair: dict | None, args, batch: int, default: str | None, target: float,
                    when: bool) -> list[dict]:
    """Our default precision's training speed over the reference's fastest precision, from the separate workers
    and from the paired rounds, each against ``target`` (judged only ``when`` the goal applies)."""
    refs = {n: r for n, r in results.items() if n.startswith(REF)}
    if not refs:
        return []
    comparable, goals = when and not args.quick, []
    best = min(refs, key=lambda n: refs[n]["step_s"])
    if default in results:
        goals.append(goal(f"batch {batch}: {default} training speed / {best}'s (separate processes)",
                          refs[best]["step_s"] / results[default]["step_s"], target, at_least=True,
                          comparable=comparable))
    if pair:
        mine = pair["ours"]
        ratios = {n: pair[f"{n}/{mine}"] for n in refs if f"{n}/{mine}" in pair}  # their seconds / ours
        if ratios:
            fastest = min(ratios, key=ratios.get)
            print(f"{PAIRED}: {mine} and {', '.join(ratios)} steps alternated over {args.steps} rounds: median step "
                  + ", ".join(f"{n} {pair[n + '_step_s']:.4f} s" for n in (mine, *ratios)))
            goals.append(goal(f"batch {batch}: {mine} training speed / {fastest}'s, median of the paired rounds",
                              ratios[fastest], target, at_least=True, comparable=comparable))
    return goals


def loss_summary(losses: list[float]) -> dict:
    """First and last loss and the mean of the last quarter of steps (the loss of one step is noisy)."""
    tail = losses[-max(1, len(losses) // 4):]
    return {"first": losses[0], "last": losses[-1], "tail_mean": sum(tail) / len(tail), "tail_steps": len(tail)}


def print_json(benchmark: str, args, **payload) -> None:
    """The closing JSON line: the benchmark's name, its settings (as run) and every number. Values JSON has no
    type for (a device, a path, the peak) are written as their text."""
    skip = {"worker", "peak", "batch"}
    config = {k: v for k, v in vars(args).items() if k not in skip}
    config["peak"] = None if args.peak is None else vars(args.peak)
    config["threads_used"] = torch.get_num_threads()
    print(json.dumps({"benchmark": benchmark, "config": config, **payload}, default=str))
