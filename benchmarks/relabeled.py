"""The relabeled set's labels of runs already made, from the per-sample files ``bench.py --keep-scores`` kept:
how many clean samples the set changes, how many poisons it gives their true label back or leaves with their
given one, and, from the files that hold the clean model's ``relabel_doubt``, the same had a suspect kept its
given label unless that doubt reached a threshold (what ``bench.diagnostics`` now records with each run).

Prints one JSON line per file: the file's name, and the figures in percent.

    python benchmarks/relabeled.py --scores <bench.py --keep-scores folder> \\
        --copies <bench.py --work folder>/data/<dataset>
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

import numpy as np

from bench import first_true_labels, relabeled_figures


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, required=True, help="folder of <copy>-<method>-<options>.csv.gz")
    parser.add_argument("--copies", type=Path, required=True,
                        help="folder of the poisoned copies, each with its truth.json")
    return parser.parse_args()


def true_labels(copies: Path, copy: str) -> dict[str, int] | None:
    """The poisons' true labels of the poisoned copy ``copy`` (None for a copy that is not one: the clean set).
    A copy of two attacks (``a+b-<rate>``) was poisoned in steps, ``a-<rate>`` first: a sample both picked
    keeps the label it had before the first (``bench.first_true_labels``)."""
    attacks, _, rest = copy.partition("-")
    names = attacks.split("+")
    steps = [copies / ("+".join(names[:index + 1]) + "-" + rest) for index in range(len(names))]
    if not all((step / "truth.json").is_file() for step in steps):
        return None
    return first_true_labels([json.loads((step / "truth.json").read_text()) for step in steps])


def main() -> None:
    args = parse_args()
    for path in sorted(args.scores.glob("*.csv.gz")):
        copy = path.name.removesuffix(".csv.gz").rsplit("-", 2)[0]
        with gzip.open(path, "rt", newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
        column = {name: np.array([int(row[name]) for row in rows]) for name in ("label", "suspected", "relabel",
                                                                                 "poisoned")}
        truth = true_labels(args.copies, copy)
        true = np.array([truth.get(row["key"], -1) for row in rows]) if truth is not None else None
        doubt = None
        if "relabel_doubt" in reader.fieldnames:
            doubt = np.array([float(row["relabel_doubt"]) for row in rows])
        figures = relabeled_figures(column["label"], column["suspected"].astype(bool), column["relabel"],
                                    column["poisoned"].astype(bool), true, doubt)
        print(json.dumps({"file": path.name, **figures}))


if __name__ == "__main__":
    main()
