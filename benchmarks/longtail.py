"""AdvrBD on long-tailed data: a CIFAR shard cut long-tailed, poisoned or not, run as a user would.

Class ``c`` keeps ``head * ratio ** (-((c - head_class) % K) / (K - 1))`` of its images (the
first ones of the shard), so ``--ratio 1`` is balanced. ``--dominant S`` cuts another shape: the
first class keeps ``head`` images, which are the share S of the set, and the others split the rest
equally (a "normal" class beside rare ones). Each run prints one JSON line: recall and FPR of the
suspects against the poisoning's truth, and the flagged share of every class.

    PYTHONPATH=. python benchmarks/longtail.py --data .data/train/train-000000.tar.gz \
        --classes .data/train/classes.json --ratio 10 --attack badnets --attack-set kind=checkerboard \
        --arch small --set quick=true --set seed=1 [--set logit_adjust=0]    # ResNet-18 without --arch
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sanitize
from sanitize.formats import read_dataset, read_scores, write_dataset
from sanitize.methods import parse_assignments


def long_tailed(samples, labels: np.ndarray, num_classes: int, head: int, ratio: float, head_class: int = 0):
    """The first samples of each class, as many as the long tail gives it (see the module docstring)."""
    keep = []
    for label in range(num_classes):
        rank = (label - head_class) % num_classes
        wanted = round(head * ratio ** (-rank / max(1, num_classes - 1)))
        keep += list(np.flatnonzero(labels == label)[:wanted])
    return [samples[index] for index in sorted(keep)]


def dominated(samples, labels: np.ndarray, num_classes: int, head: int, share: float, head_class: int = 0):
    """The first ``head`` samples of ``head_class`` and of every other class an equal number, so that the
    head class holds ``share`` of the set."""
    if not 0 < share < 1:
        raise ValueError(f"the dominant class's share must lie between 0 and 1, not {share}")
    others = round(head * (1 - share) / share / max(1, num_classes - 1))
    keep = []
    for label in range(num_classes):
        keep += list(np.flatnonzero(labels == label)[:head if label == head_class else others])
    return [samples[index] for index in sorted(keep)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="WebDataset shard(s) or ImageFolder of CIFAR images")
    parser.add_argument("--classes", help="class list (classes.json) for the shards")
    parser.add_argument("--ratio", type=float, default=10.0, help="largest / smallest class size")
    parser.add_argument("--head", type=int, default=800, help="images kept of the largest class")
    parser.add_argument("--head-class", type=int, default=0, help="the largest class")
    parser.add_argument("--dominant", type=float, help="instead of a long tail: the largest class's share of "
                                                         "the set, the others equal")
    parser.add_argument("--attack", default="none", help="an attack of sanitize poison, or none")
    parser.add_argument("--target", type=int, default=0, help="the attack's target class")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="AdvrBD options, as sanitize run --set")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    ingested = read_dataset(args.data, classes_file=args.classes)
    if args.dominant is None:
        kept = long_tailed(ingested.samples, ingested.labels, len(ingested.classes), args.head, args.ratio,
                           args.head_class)
    else:
        kept = dominated(ingested.samples, ingested.labels, len(ingested.classes), args.head, args.dominant,
                         args.head_class)
    with tempfile.TemporaryDirectory() as work:
        data = write_dataset(Path(work) / "longtail", kept, ingested.classes)
        poisoned = set()
        if args.attack != "none":
            truth = sanitize.poison(data, attack=args.attack, rate=args.rate, target=args.target,
                                    out=Path(work) / "poisoned", **parse_assignments(args.attack_set))
            data, poisoned = Path(work) / "poisoned", set(truth["poisoned"])
        started = time.perf_counter()
        result = sanitize.run(data, out=Path(work) / "out", arch=args.arch, device=args.device,
                              **parse_assignments(args.sets))
        rows = read_scores(Path(work) / "out")
    flagged = [row for row in rows if row["suspected"]]
    found = sum(row["key"] in poisoned for row in flagged)
    clean = len(rows) - len(poisoned)
    classes = ingested.classes
    record = {"ratio": args.ratio, "dominant": args.dominant, "head_class": args.head_class, "attack": args.attack,
              "target": args.target, "options": args.sets,
              "samples": len(rows), "poisons": len(poisoned),
              "recall": round(100 * found / len(poisoned), 1) if poisoned else None,
              "fpr": round(100 * (len(flagged) - found) / max(1, clean), 1),
              "logit_adjust": result.metrics.get("logit_adjust"),
              "flagged_by_class": {name: f"{result.per_class[name]['suspected']}/{result.per_class[name]['total']}"
                                   for name in classes},
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
