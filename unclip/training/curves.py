"""Loss and metric curves of runs, read from their log.jsonl and drawn as one PNG (matplotlib, no display)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Sequence

from unclip.files import write_atomic

LOG = "log.jsonl"


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/log.jsonl`` (a line cut short by a crash is skipped)."""
    records = []
    path = Path(run_dir) / LOG
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values): ``loss`` of the training records, then every scalar of the evaluations."""
    out: dict[str, tuple[list[int], list[float]]] = {}

    def add(name: str, step: int, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps, values = out.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))

    for record in records:
        if "loss" in record and "samples_per_s" in record:
            add("loss", record["step"], record["loss"])
        for key, value in (record.get("eval") or {}).items():
            add(key, record["step"], value)
    return out


def panels(runs: Sequence[dict]) -> dict[str, str]:
    """The curves to draw (of runs' ``series``) and their titles. A metric's sample count (``n_fid_clip_g3_val``)
    is no curve: it goes into the title of the curve it counts (``fid_clip_g3_val (n=48)``)."""
    names = list(dict.fromkeys(name for run in runs for name in run if not name.startswith("n_"))) or ["loss"]
    titles = {}
    for name in names:
        counts = sorted({int(v) for run in runs for v in run.get(f"n_{name}", ([], []))[1]})
        titles[name] = name + (f" (n={', '.join(map(str, counts))})" if counts else "")
    return titles


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
              columns: int = 4) -> Path:
    """One panel per curve (the training loss first, then each evaluation metric), one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [series(read_log(run_dir)) for run_dir in run_dirs]
    labels = list(labels or [Path(run_dir).name or str(run_dir) for run_dir in run_dirs])
    panel_titles = panels(runs)
    names = list(panel_titles)
    columns = min(columns, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for run, label in zip(runs, labels):
            if name in run:
                steps, values = run[name]
                axes.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        axes.set_title(panel_titles[name], fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        if name == "loss" and all(v > 0 for run in runs for v in run.get("loss", ([], []))[1]):
            axes.set_yscale("log")
        if len(runs) > 1 and index == 0:
            axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(out).suffix.lstrip(".") or "png", dpi=90)
    return write_atomic(out, buffer.getvalue())  # a symlink at ``out`` is replaced, never written through
