"""Compare the loss and metric curves of runs: `python train/plot.py outputs/decoder/a outputs/decoder/b`.

Reads each run directory's log.jsonl and writes one PNG (default `curves.png`): one panel per curve (the
training loss, then every evaluation metric), one line per run. Every training run also draws its own
`<run>/curves.png` when it ends.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.training.curves import LOG, plot_runs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with a log.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    parser.add_argument("--labels", nargs="*", help="a legend label per run (default: the directories' names)")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / LOG).is_file()]
    if missing:
        parser.error(f"no {LOG} in {', '.join(missing)}: give run directories of train/*.py jobs")
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} labels for {len(args.runs)} runs")
    out = plot_runs(args.runs, args.out, labels=args.labels)
    print(out)
    return out


if __name__ == "__main__":
    main()
