"""Replay AdvrBD's stages 6-7 (clean model, relabel, fine-tune) from a detection that bench.py kept.

The detection (stages 1-5) is most of a run's time; what comes after it decides what the
user's model is worth. This takes the suspects of one ``bench.py --keep-scores`` file, trains
the clean model once (stage 6), then runs stage 7 once per variant on a copy of it and
measures each final model on the test shard as bench.py does (ACC, ASR, ACC by class):

    PYTHONPATH=. python benchmarks/replay_clean.py --poisoned /tmp/bench/data/cifar10/blend-0.05 \\
        --scores <keep-scores dir>/blend-0.05-advrbd-<id>.csv.gz --test .data/test/test-000000.tar.gz \\
        --arch small --quick --variants '[{}, {"finetune_rebalance": true}]'

``--poisoned`` is the poisoned copy bench.py wrote into its ``--work`` folder (``data/<attack>-<rate>``,
with its truth.json); ``--arch``, ``--quick`` and ``--set`` must be those of the kept run for the
default variant to reproduce it. Variants may change stage-7 options only (``relabel_prior``,
``finetune_rebalance``, ``finetune_epochs``, ``finetune_lr``, ``finetune_unlearn``): the clean model is
shared. A clean set (no truth.json beside the shards: ``--poisoned`` the data bench.py read) is replayed
too, without an ASR. Prints one JSON line per variant, with how the target class's flagged clean samples
were labeled after the clean model and at the end.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench import evaluate, parse_variants
from sanitize import methods, train
from sanitize.attacks import make_attack
from sanitize.data import Bank
from sanitize.formats import read_dataset
from sanitize.methods import advrbd
from sanitize.methods.base import StageClock
from sanitize.train import resolve_device

STAGE_7 = frozenset({"relabel_prior", "finetune_rebalance", "finetune_epochs", "finetune_lr", "finetune_unlearn"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poisoned", type=Path, required=True, help="bench.py's poisoned shards, with truth.json")
    parser.add_argument("--scores", type=Path, required=True, help="the kept run's csv.gz (bench.py --keep-scores)")
    parser.add_argument("--test", type=Path, required=True, help="test shard(s), with classes.json beside them")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="the kept run's method options, as bench.py took them")
    parser.add_argument("--variants", default="[{}]", help="JSON list of stage-7 option dicts, one replay each")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    variants = parse_variants(args.variants, STAGE_7, "stage-7")
    device = resolve_device(args.device)
    truth_file = args.poisoned / "truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.exists() else {"attack": None, "target": 0}
    ingested = read_dataset(args.poisoned)
    bank = Bank.from_arrays(ingested.images, ingested.labels, ingested.classes, device)
    suspected, poisoned, score = kept_detection(args.scores, [sample.key for sample in ingested.samples])
    attacks = [(make_attack(truth["attack"], **truth["params"]), truth["target"])] if truth["attack"] else []
    test = read_dataset(args.test)
    options = {**methods.parse_assignments(args.sets), "arch": args.arch, "quick": args.quick}
    base = methods.resolve_options("advrbd", **options)
    flagged = torch.as_tensor(suspected, device=device)
    clean_model = advrbd.train_clean(bank, base, flagged, StageClock(device))
    target_clean = suspected & ~poisoned & (bank.labels.cpu().numpy() == truth["target"])
    given = bank.labels.cpu().numpy()
    fit_before = fit_by_label(train.predict_logits(clean_model, bank.images).argmax(1).cpu().numpy(), given,
                              ~suspected, bank.num_classes)
    records = []
    for variant in variants:
        start = time.perf_counter()
        model = copy.deepcopy(clean_model)
        opts = methods.resolve_options("advrbd", **options, **variant)
        relearned = advrbd.relearn(model, bank, opts, torch.as_tensor(score), flagged, StageClock(device))
        kept, labels = relearned.kept.cpu().numpy(), relearned.finetune_label.cpu().numpy()
        final = relearned.relabel.cpu().numpy()
        records.append({
            "variant": variant, **evaluate(model, test, attacks, device),
            "seconds": round(time.perf_counter() - start, 1),
            "finetune_kept_by_label": np.bincount(labels[kept], minlength=bank.num_classes).tolist(),
            "poisons_kept": int((kept & poisoned).sum()),
            "unlearned": [int(relearned.unlearned.sum()), int((relearned.unlearned.cpu().numpy() & poisoned).sum())],
            "target_clean_flagged": int(target_clean.sum()),
            # of those, how many the clean model (before fine-tuning) and the final model call the target
            "target_clean_called_target": [int((labels[target_clean] == truth["target"]).sum()),
                                           int((final[target_clean] == truth["target"]).sum())],
            # the samples the split left, each class's share fitted with its label by the clean model and by
            # the final one: unlearning a class's own images (not a trigger) takes that class down with them
            "unflagged_fit_by_label": [fit_before, fit_by_label(final, given, ~suspected, bank.num_classes)],
            "metrics": relearned.metrics})
        print(json.dumps(records[-1]), flush=True)
    return records


def fit_by_label(predicted: np.ndarray, given: np.ndarray, chosen: np.ndarray, num_classes: int) -> list:
    """For each class, the share (%) of the ``chosen`` samples labeled so whose ``predicted`` label is it."""
    return [round(float((predicted[chosen & (given == label)] == label).mean() * 100), 1)
            if (chosen & (given == label)).any() else None for label in range(num_classes)]


def kept_detection(path: Path, keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(suspected, poisoned) bool [N] and score float64 [N] in the order of ``keys``, from a bench.py
    --keep-scores file."""
    with gzip.open(path, "rt", newline="", encoding="utf-8") as file:
        rows = {row["key"]: row for row in csv.DictReader(file)}
    missing = [key for key in keys if key not in rows]
    if missing:
        raise SystemExit(f"{path} is not a detection of this data: {len(missing)} of its samples are missing, "
                         f"first {missing[0]!r}")
    return (np.array([rows[key]["suspected"] == "1" for key in keys]),
            np.array([rows[key]["poisoned"] == "1" for key in keys]),
            np.array([float(rows[key]["score"]) for key in keys]))


if __name__ == "__main__":
    main()
