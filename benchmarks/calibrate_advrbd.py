"""Calibrate AdvrBD's options on a poisoned bank in memory: how well each stage separates the poisons.

    PYTHONPATH=. python benchmarks/calibrate_advrbd.py --data .data/train/train-000000.tar.gz \
        --classes .data/train/classes.json --attack blend --arch small \
        --set warmup_epochs=5 --set detect_augment=flip

Prints one JSON line per variant: the options changed, the AUROC of the warm-up KL (low KL =
robust = poisoned), how many poisons fell into the unlearn set, the AUROC of the final score,
recall and FPR of the split (and ``split_at`` other margins), the method's metrics and stage
timings; with ``--detect-only`` also ``rounds``: after the partition (round 0) and after
each enhancement round, the share of poisons and of clean samples outside the unlearn set
that the model fits (given-label margin > 0), the poisons in the unlearn set, and the recall,
FPR and AUROC the split would have if that round were the last (the same run with fewer
``enhance_rounds`` is that prefix). Unlike
bench.py it writes nothing and trains no final ONNX model: it is for choosing defaults
(the figures quoted in sanitize/methods/advrbd.py came from it), on a CPU with the small
CNN or on a GPU.

``--warmup-only`` stops after stage 1 and reports the share of poisons and of clean samples the
warm-up fits (no PGD: cheap enough for ResNet-18 on a CPU subset).

``--score-steps 3,2,1`` asks what fewer PGD steps cost the robustness score (stage 2, and the
re-scoring that dominates the enhancement's time): after the warm-up and after one enhancement
round, each step count's seconds and the overlap of its partition (the ``partition_rate`` least
robust samples) with that of ``pgd_steps``, beside the overlap of ``pgd_steps`` with itself
under another seed (other masks and starts: the noise floor of the selection).

``--variants '[{"warmup_epochs": 10}, {"unlearn_weight": 1.0}]'`` runs each option set (on
top of ``--set``) on the same poisoned bank in one process; ``--detect-only`` stops after the
split (stages 1-5), which is all that the detection figures need.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace

import numpy as np
import torch

from bench import by_label, detection_rates, parse_variants, percent_auroc, poisoned_bank, split_at
from sanitize import methods, train
from sanitize.data import Bank
from sanitize.methods import advrbd
from sanitize.methods.base import StageClock


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training shard(s) or folder")
    parser.add_argument("--classes", help="classes.json, if not beside the data")
    parser.add_argument("--limit", type=int, help="use the first N samples only")
    parser.add_argument("--attack", default="badnets", help="an attack name, or none: the clean set")
    parser.add_argument("--attack-set", dest="attack_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="attack parameter (a JSON value, else a string), e.g. --attack-set kind=checkerboard")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="AdvrBD option (a JSON value, else a string), for every variant")
    parser.add_argument("--variants", default="[{}]", help="JSON list of option dicts, one run each")
    parser.add_argument("--detect-only", action="store_true", help="stop after the split (stages 1-5)")
    parser.add_argument("--warmup-only", action="store_true",
                        help="stop after the warm-up: how many poisons and clean samples it fits (no PGD)")
    parser.add_argument("--score-steps", help="comma-separated PGD step counts to set beside pgd_steps "
                                              "(the partition each one picks; no split)")
    args = parser.parse_args()
    common = methods.parse_assignments(args.sets)
    variants = parse_variants(args.variants, frozenset(f.name for f in fields(advrbd.AdvrbdOptions)), "AdvrBD")
    attack_params = methods.parse_assignments(args.attack_sets, "--attack-set")

    # the clean set (--attack none): every figure that needs poisons is None
    bank, positive, _ = poisoned_bank(args, attack_params)
    for variant in variants:
        changes = {**common, **variant}
        options = methods.resolve_options("advrbd", arch=args.arch, **changes)
        print(json.dumps({"attack": args.attack, "attack_params": attack_params, "samples": bank.n,
                          "changes": changes, **(warmup(bank, options, positive) if args.warmup_only else
                                                 score_steps(bank, options, positive, args.score_steps)
                                                 if args.score_steps else
                                                 calibrate(bank, options, positive, args.detect_only))}),
              flush=True)


def calibrate(bank: Bank, options, positive, detect_only: bool) -> dict:
    """One AdvrBD run (or its detection stages) on ``bank``; ``positive`` bool [N] marks the poisons."""
    is_poison = torch.from_numpy(positive).to(bank.device)
    rounds = []

    def observe(round_index, margin, unlearn):
        fits = margin > 0
        # the split's figures, were this round the last
        split = detection_rates(margin.double().cpu().numpy(), (margin > options.split_margin).cpu().numpy(), positive)
        rounds.append({"round": round_index, "poisons_fit": _share(fits[is_poison & ~unlearn], is_poison.sum()),
                       "clean_rest_fit": _share(fits[~is_poison & ~unlearn], (~is_poison & ~unlearn).sum()),
                       "poisons_in_unlearn_set": int((unlearn & is_poison).sum()), **split})

    start = time.perf_counter()
    if detect_only:
        metrics: dict = {}
        clock = StageClock(bank.device)
        found = advrbd.detect(bank, options, clock, metrics, observe)
        score, suspected = found.score.double().cpu().numpy(), found.suspected.cpu().numpy()
        warmup_kl, unlearn = found.warmup_kl.cpu().numpy(), (found.unlearn_round >= 0).cpu().numpy()
        timings = clock.timings_s
    else:
        result = advrbd.run(bank, options)  # the seam takes no observer: no per-round figures here
        score, suspected, metrics, timings = result.score, result.suspected, result.metrics, result.timings_s
        warmup_kl, unlearn = result.details["warmup_kl"], result.details["unlearn"]
    rates = detection_rates(score, suspected, positive)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "warmup_kl_auroc": percent_auroc(-warmup_kl, positive),
        "poisons_in_unlearn_set": int((unlearn & positive).sum()), "unlearn_set": int(unlearn.sum()),
        "score_auroc": rates["auroc"], "recall": rates["recall"], "fpr": rates["fpr"],
        "split_at": split_at(score, positive),  # the split at other margins, from the same score
        "false_positives_by_label": by_label(bank.labels.cpu().numpy()[suspected & ~positive], bank.num_classes),
        "rounds": rounds, "metrics": metrics, "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def warmup(bank: Bank, options, positive) -> dict:
    """Stage 1 only: the share of poisons and of clean samples the warm-up fits with their given label.

    A dirty-label poison is fitted only once its trigger is learned (or the image memorised):
    the cheap question before any PGD, e.g. whether an augmentation hides a trigger.

    Also ``confident_other_by_label``: per given label, the share of samples the warm-up assigns to
    another class with probability > 0.5 (and ``poisons_confident_other``). A dirty-label backdoor the
    warm-up has not learned would show as an excess of these in its target class, if it shows at all.
    """
    is_poison = torch.from_numpy(positive).to(bank.device)
    opts = options.resolved()
    start = time.perf_counter()
    probs = train.predict_logits(advrbd.warm_up(bank, opts), bank.images, 1024).float().softmax(1)
    margin = advrbd.label_margin(probs, bank.labels)
    confident, predicted = probs.max(1)
    other = (predicted != bank.labels) & (confident > 0.5)
    fits = margin > 0
    return {"seconds": round(time.perf_counter() - start, 1),
            "poisons_fit": _share(fits[is_poison], is_poison.sum()),
            "clean_fit": _share(fits[~is_poison], (~is_poison).sum()),
            "margin_auroc": percent_auroc(margin.double().cpu().numpy(), positive),
            "poisons_confident_other": _share(other[is_poison], is_poison.sum()),
            "confident_other_by_label": [_share(other[bank.labels == label], (bank.labels == label).sum())
                                         for label in range(bank.num_classes)]}


def score_steps(bank: Bank, options, positive, steps: str) -> dict:
    """What fewer PGD steps change in the partition: see the module docstring (``--score-steps``)."""
    opts = options.resolved()
    everything = train.all_indices(bank)
    count = advrbd.partition_size(opts, bank.n)
    model = advrbd.warm_up(bank, opts)
    found = {}
    for stage in ("warmup", "enhanced"):
        if stage == "enhanced":
            advrbd.enhance_backdoor(model, bank, replace(opts, enhance_rounds=1), StageClock(bank.device), {})
        chosen, rows, clock = {}, {}, StageClock(bank.device)
        for count_of_steps in [opts.pgd_steps, *(int(s) for s in steps.split(","))]:
            with clock(str(count_of_steps)):
                kl = advrbd.robustness_kl(model, bank, everything, replace(opts, pgd_steps=count_of_steps), opts.seed)
            chosen[count_of_steps] = kl.topk(count).indices.cpu().numpy()
            rows[str(count_of_steps)] = {
                "seconds": round(clock.timings_s[str(count_of_steps)], 2),
                "overlap": _overlap(chosen[count_of_steps], chosen[opts.pgd_steps]),
                "poisons_in_partition": int(positive[chosen[count_of_steps]].sum())}
        reseeded = advrbd.robustness_kl(model, bank, everything, opts, opts.seed + 1).topk(count).indices.cpu().numpy()
        found[stage] = {"steps": rows, "reseeded_overlap": _overlap(reseeded, chosen[opts.pgd_steps])}
    return found


def _overlap(first: np.ndarray, second: np.ndarray) -> float:
    """The share of ``second``'s samples that ``first`` also holds (equal sizes)."""
    return round(len(np.intersect1d(first, second)) / max(1, len(second)), 4)


def _share(selected: torch.Tensor, total) -> float | None:
    return round(100 * float(selected.sum()) / int(total), 2) if int(total) else None


if __name__ == "__main__":
    main()
