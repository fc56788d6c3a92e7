"""What the benchmarks share: flags, precision, the timed training loop, peak memory, workers, the report.

Each precision is measured in a fresh process (``--worker bf16`` / ``--worker fp32``) started by the script
itself: on the CPU the only exact peak-memory measure is the process's peak RSS (``ru_maxrss``; psutil sees
the current RSS only), so precisions must not share a process. The worker prints its numbers as one JSON
line; the parent prints the table and ends with one JSON line of everything.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from ema_pytorch import EMA

from unclip.training.config import TrainerConfig
from unclip.training.trainer import make_optimizer

PRECISIONS = ("bf16", "fp32")
REFERENCE = "DALLE2-pytorch 1.15.6"
HERE = "ref-here"  # the worker (and the column) of a reference measured in this run, where a benchmark offers it
PAIRED = "paired"  # the worker that alternates our default precision's steps with the reference's


# -- flags --------------------------------------------------------------------------------------------
def parser(description: str, *, steps: int, warmup: int, sample_runs: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=steps, help="timed training steps per precision")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed training steps before them")
    p.add_argument("--sample-steps", type=int, default=64, help="DDIM steps when sampling")
    p.add_argument("--sample-runs", type=int, default=sample_runs, help="timed sampling runs (median)")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--ema", action="store_true", help="also update an EMA copy every step, as the Trainer does")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny counts: check that the script runs")
    p.add_argument("--worker", choices=(*PRECISIONS, HERE, PAIRED), help=argparse.SUPPRESS)  # internal: measure one
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.sample_steps, args.sample_runs = 2, 1, 4, 1
    for name, low in (("steps", 1), ("warmup", 0), ("sample_steps", 1), ("sample_runs", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def setting(args: argparse.Namespace) -> str:
    """The run's device, threads and counts, for the report's header."""
    device = str(args.device) + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    return (f"{device}, threads {torch.get_num_threads()}, torch {torch.__version__}; {args.steps} timed training "
            f"steps after {args.warmup} warm-up{', with EMA' if args.ema else ''}; sampling: median of "
            f"{args.sample_runs} run(s) of {args.sample_steps} DDIM steps")


# -- measuring ----------------------------------------------------------------------------------------
def autocast(device: torch.device, precision: str):
    """bf16 autocast (our default training precision, as accelerate applies it) or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
        ema = EMA(model, beta=cfg.ema_beta, update_after_step=0, param_or_buffer_names_no_ema=no_ema).to(device)

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
    """``args.warmup + args.steps`` steps of ``train_step``.

    ``make_batch(i)`` builds step i's batch outside the timed region. Returns the median seconds of each phase
    over the timed steps, every step's loss, the peak memory of the whole loop and, with ``--profile``, a
    table of the top ops of one extra step.
    """
    device = args.device
    step = train_step(model, loss_fn, args, precision)

    memory = PeakMemory(device)
    phases, losses = [], []
    for i in range(args.warmup + args.steps):
        loss, seconds = step(make_batch(i))
        losses.append(loss.item())
        if i >= args.warmup:
            phases.append(seconds)
        print(f"  {precision} step {i + 1}/{args.warmup + args.steps}: {sum(seconds):.3f} s, loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)
    result = {"memory": memory.result(), "losses": losses}
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


def latency(fn: Callable[[int], object], args) -> float:
    """Median seconds of ``fn(args.sample_steps)`` over ``args.sample_runs`` runs, after a 2-step warm-up."""
    fn(min(2, args.sample_steps))
    seconds = []
    for _ in range(args.sample_runs):
        start = now(args.device)
        fn(args.sample_steps)
        seconds.append(now(args.device) - start)
    return statistics.median(seconds)


# -- processes ----------------------------------------------------------------------------------------
def run_workers(script: str, args, workers: list[str] | None = None) -> dict[str, dict]:
    """Run ``script`` once per precision (or per name in ``workers``) in a fresh process; echo its output and
    collect its JSON line."""
    results = {}
    for precision in workers or args.precisions:
        print(f"measuring {precision} in a fresh process ...", file=sys.stderr, flush=True)
        argv = [sys.executable, script, *sys.argv[1:], "--worker", precision]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.rstrip("\n").splitlines()
        if proc.returncode or not lines:
            sys.exit(f"the {precision} worker failed (exit code {proc.returncode}): {' '.join(argv)}")
        *text, last = lines
        if text:
            print("\n".join(text))
        results[precision] = json.loads(last)
    return results


# -- the report ---------------------------------------------------------------------------------------
def table(rows: list[tuple[str, dict, object]], precisions, fmt: str = "{:.2f}") -> None:
    """Print rows of (label, {precision: value}, reference value or None) as aligned columns."""
    def cell(value) -> str:
        return "-" if value is None else fmt.format(value) if isinstance(value, (int, float)) else str(value)

    print(f"{'':<44}" + "".join(f"{p:>12}" for p in precisions) + f"   {REFERENCE} (fp32, the issue's numbers)")
    for label, values, reference in rows:
        print(f"{label:<44}" + "".join(f"{cell(values.get(p)):>12}" for p in precisions) + f"   {cell(reference)}")


def goal(description: str, value: float | None, target: float, at_least: bool, comparable: bool = True) -> dict:
    """Print one goal line; return it for the JSON."""
    if value is None or not comparable:
        verdict = "n/a" if value is None else "not comparable (settings differ from the reference's)"
    else:
        verdict = "met" if (value >= target if at_least else value <= target) else "not met"
    shown = "-" if value is None else f"{value:.2f}"
    print(f"goal: {description} {'>=' if at_least else '<='} {target:.2f}: {shown} -> {verdict}")
    return {"description": description, "target": target, "value": value, "verdict": verdict}


def loss_summary(losses: list[float]) -> dict:
    """First and last loss and the mean of the last quarter of steps (the loss of one step is noisy)."""
    tail = losses[-max(1, len(losses) // 4):]
    return {"first": losses[0], "last": losses[-1], "tail_mean": sum(tail) / len(tail), "tail_steps": len(tail)}


def print_json(benchmark: str, args, **payload) -> None:
    """The closing JSON line: the benchmark's name, its settings (as run) and every number."""
    config = {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items() if k != "worker"}
    config["threads_used"] = torch.get_num_threads()
    print(json.dumps({"benchmark": benchmark, "config": config, **payload}))
