"""Collect the evaluation figures of several training runs into one JSON table.

    python scripts/summarize_runs.py runs/compare

Reads RUN/eval/eval_results.json for every run directory under the given folder, writes
FOLDER/comparison.json ({run: identity, masked top-1, masked top-5}) and prints it.
"""

import json
import sys
from pathlib import Path

METRICS = ("identity_accuracy", "masked_top1_accuracy", "masked_top5_accuracy")


def main(folder: str):
    folder = Path(folder)
    rows = {}
    for run in sorted(path for path in folder.iterdir() if (path / "eval" / "eval_results.json").exists()):
        result = json.loads((run / "eval" / "eval_results.json").read_text())
        rows[run.name] = {metric: result[metric] for metric in METRICS}
    if not rows:
        raise SystemExit(f"no RUN/eval/eval_results.json under {folder}")
    (folder / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
