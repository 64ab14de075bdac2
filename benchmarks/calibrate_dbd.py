"""Calibrate DBD's stages 3-4 (the filter and MixMatch): the backbone and head once, MixMatch per variant.

    PYTHONPATH=. python benchmarks/calibrate_dbd.py --data .data/train --test .data/test/test-000000.tar.gz \\
        --attack badnets --variants '[{"filter_by_class": false}, {}]'

SimCLR is most of a DBD run's time and the head takes seconds, but what the filter and MixMatch
make of them decides the clean model's accuracy (ACC 72 against 89 undefended on the H100).
This poisons the data in memory, trains the backbone and the SCE head once, then runs stages 3-4
once per variant on a copy of that model and measures each final model on the test shard as
bench.py does. Variants may change the options of stages 3-4 only (``STAGES_3_4``); ``--set``
applies to every stage. Prints one JSON line per variant: ACC, ASR, ACC by class, the labeled
samples of each class after the head's filter and at the end, the poisons among them, the share
of the clean samples the head's filter left unlabeled that the final model labels right, and the
final score's recall, FPR and AUROC, and the relabeled set's figures (``bench.relabeled_figures``:
clean labels changed, poisons left their given label, and both by the final model's doubt). Like
calibrate_advrbd.py it writes nothing and exports no model.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import numpy as np
import torch

from bench import by_label, detection_rates, evaluate, parse_variants, percent_auroc, poisoned_bank, relabeled_figures
from sanitize import methods, train
from sanitize.data import Bank
from sanitize.formats import read_dataset
from sanitize.methods import dbd
from sanitize.methods.base import StageClock

STAGES_3_4 = frozenset({"filter_ratio", "filter_by_class", "refilter_by_class", "mixmatch_epochs", "mixmatch_lr",
                        "mixmatch_weight_decay", "sharpen_temperature", "unlabeled_views", "lambda_u",
                        "mixup_alpha"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training shard(s) or folder")
    parser.add_argument("--classes", help="classes.json, if not beside the data")
    parser.add_argument("--test", required=True, help="test shard(s), with classes.json beside them")
    parser.add_argument("--limit", type=int, help="use the first N training samples only")
    parser.add_argument("--attack", default="badnets", help="an attack name, or none: the clean set")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="DBD option (a JSON value, else a string), for every stage and variant")
    parser.add_argument("--variants", default="[{}]", help="JSON list of stage 3-4 option dicts, one run each")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    variants = parse_variants(args.variants, STAGES_3_4, "stage 3-4")
    common = methods.parse_assignments(args.sets)
    options = methods.resolve_options("dbd", arch=args.arch, quick=args.quick, **common)

    bank, positive, attacks = poisoned_bank(args)
    test = read_dataset(args.test)

    clock = StageClock(bank.device)
    model, _, _, head_loss = dbd.decouple(bank, options, clock)
    stages_1_2 = {name: round(seconds, 1) for name, seconds in clock.timings_s.items()}
    records = []
    for variant in variants:
        figures = finetune(copy.deepcopy(model), bank, replace(options, **variant), head_loss, positive, test, attacks)
        record = {"attack": args.attack, "samples": bank.n, "changes": {**common, **variant},
                  "stages_1_2_s": stages_1_2, **figures}
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


def finetune(model, bank: Bank, opts: dbd.DbdOptions, head_loss: torch.Tensor, positive: np.ndarray, test,
             attacks: list) -> dict:
    """Stages 3-4 on ``model`` (its backbone and head trained), then the figures of the module docstring."""
    labels = bank.labels.cpu().numpy()
    start = time.perf_counter()
    final = dbd.mixmatch_finetune(model, bank, head_loss, opts)
    seconds = time.perf_counter() - start
    head_labeled = np.zeros(bank.n, bool)
    head_labeled[final["head_labeled"].cpu().numpy()] = True
    relabel, doubt = (values.cpu().numpy() for values in train.relabel_with_doubt(model, bank.images, bank.labels))
    labeled = np.zeros(bank.n, bool)
    labeled[final["labeled"].cpu().numpy()] = True
    score = final["loss"].double().cpu().numpy()
    # the clean samples the head's filter left unlabeled: the final unlabeled set is, by construction,
    # what the final model fits worst in each class, so its accuracy would say nothing
    head_unlabeled = ~head_labeled & ~positive
    history = final["history"].cpu()
    return {**evaluate(model, test, attacks, bank.device),
            "head_labeled_by_class": by_label(labels[head_labeled & ~positive], bank.num_classes),
            "head_labeled_poisons": int((head_labeled & positive).sum()),
            "head_loss_auroc": percent_auroc(head_loss.double().cpu().numpy(), positive),
            "labeled_by_class": by_label(labels[labeled & ~positive], bank.num_classes),
            "labeled_poisons": int((labeled & positive).sum()),
            # how well MixMatch learned the samples it started without labels for
            "head_unlabeled_clean_right": round(100 * float((relabel == labels)[head_unlabeled].mean()), 2)
            if head_unlabeled.any() else None,
            **detection_rates(score, ~labeled, positive),
            "relabeled": relabeled_figures(labels, ~labeled, relabel, positive, None, doubt),
            "mixmatch_loss_x": dbd.rounded(history[:, 0]), "mixmatch_s": round(seconds, 1)}


if __name__ == "__main__":
    main()
