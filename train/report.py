"""One HTML page per run: `python train/report.py outputs/demo`, or side by side: `report.py RUN_A RUN_B`.

The page (images embedded, one file) shows what was trained and for how long, the training curves, the sample grid
and the metrics tables (unclip.report). One run's page is written into it (`RUN/report.html`); several runs' beside
the first (`report-A-vs-B.html`), or where `--out` says. train/demo.py writes its page when it ends.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unclip.report import write_report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (train/*.py) or demo directories")
    parser.add_argument("--out", type=Path, help="the HTML file to write")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(out)
    return out


if __name__ == "__main__":
    main()
