"""Calibrate AdvrBD's options on a poisoned bank in memory: how well each stage separates the poisons.

    PYTHONPATH=. python benchmarks/calibrate_advrbd.py --data .data/train/train-000000.tar.gz \
        --classes .data/train/classes.json --attack blend --arch small \
        --set warmup_epochs=5 --set detect_augment=true

Prints one JSON line: the options changed, the AUROC of the warm-up KL (low KL = robust =
poisoned), how many poisons fell into the unlearn set, the AUROC of the final score,
recall and FPR of the split, the method's metrics and stage timings. Unlike bench.py it
writes nothing and trains no final ONNX model: it is for choosing defaults (the figures
quoted in sanitize/methods/advrbd.py came from it), on a CPU with the small CNN or on a GPU.
"""
from __future__ import annotations

import argparse
import json
import time

from bench import TARGET, auroc
from sanitize import methods, train
from sanitize.attacks import make_attack
from sanitize.data import Bank
from sanitize.formats import read_dataset
from sanitize.methods import advrbd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training shard(s) or folder")
    parser.add_argument("--classes", help="classes.json, if not beside the data")
    parser.add_argument("--limit", type=int, help="use the first N samples only")
    parser.add_argument("--attack", default="badnets")
    parser.add_argument("--attack-set", dest="attack_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="attack parameter (JSON value), e.g. --attack-set kind='\"checkerboard\"'")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="AdvrBD option (JSON value)")
    args = parser.parse_args()
    changes = {key: json.loads(value) for key, value in (s.split("=", 1) for s in args.sets)}
    attack_params = {key: json.loads(value) for key, value in (s.split("=", 1) for s in args.attack_sets)}

    data = read_dataset(args.data, classes_file=args.classes)
    images, labels = data.images[:args.limit], data.labels[:args.limit]
    poisoned = make_attack(args.attack, **attack_params).poison(images, labels, rate=args.rate, target=TARGET,
                                                                seed=0, num_classes=len(data.classes))
    device = train.resolve_device(args.device)
    bank = Bank.from_arrays(poisoned.images, poisoned.labels, data.classes, device=device)
    options = methods.resolve_options("advrbd", arch=args.arch, **changes)
    train.configure_determinism()
    start = time.perf_counter()
    result = advrbd.run(bank, options)
    positive, suspected = poisoned.poisoned, result.suspected
    print(json.dumps({
        "attack": args.attack, "attack_params": attack_params, "samples": bank.n, "changes": changes,
        "seconds": round(time.perf_counter() - start, 1),
        "warmup_kl_auroc": round(100 * auroc(-result.details["warmup_kl"], positive), 2),
        "poisons_in_unlearn_set": int((result.details["unlearn"] & positive).sum()),
        "unlearn_set": int(result.details["unlearn"].sum()),
        "score_auroc": round(100 * auroc(result.score, positive), 2),
        "recall": round(100 * float(suspected[positive].mean()), 2),
        "fpr": round(100 * float(suspected[~positive].mean()), 2),
        "metrics": result.metrics, "timings_s": {k: round(v, 1) for k, v in result.timings_s.items()},
    }), flush=True)


if __name__ == "__main__":
    main()
