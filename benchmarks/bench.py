"""The defense benchmark: attacks x methods on CIFAR-10, one record per cell in results.json.

Each cell poisons the training shards on disk (``sanitize.attacks.poison_dataset``),
then runs the method exactly as a user would (``sanitize.run``: ingest to exported
ONNX model) and measures the clean model on the test shard: ACC, ASR (test-time
trigger on the samples the attack counts), detection recall / false-positive rate,
AUROC of ``score``, wall time per stage, peak GPU memory. ``--methods none`` is the
same architecture trained on the poisoned set without defense (the baseline).

Resumable: a cell already in the results file (same dataset, attack, rate, method,
commit and options) is skipped. A cell that fails is reported (traceback, exit status 1
at the end), not recorded, and the others still run: GPU time is scarce. Run it on the
GPU machine; see RESULTS.md for the exact commands.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import sanitize
from sanitize import methods, pipeline, train
from sanitize.attacks import make_attack, poison_dataset
from sanitize.cli import StageProgress
from sanitize.data import Bank
from sanitize.formats import read_dataset, read_scores
from sanitize.models import build_model

TARGET = 0
SPLIT_MARGINS = (0.0, 0.3, 0.5, 0.7, 0.9)  # AdvrBD's split_margin candidates, recorded from each run's score


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="training shards (folder with classes.json)")
    parser.add_argument("--test", type=Path, required=True, help="test shard(s), with classes.json beside them")
    parser.add_argument("--attacks", default="badnets,blend,wanet,sig,none",
                        help="attack names; 'a+b' poisons with two triggers at once (targets 0 and 1, each at --rate)")
    parser.add_argument("--methods", default="none,advrbd")
    parser.add_argument("--rates", default="0.05")
    parser.add_argument("--dataset", default="cifar10",
                        help="the records' dataset name, part of a cell's identity: name a subset of the shards "
                             "(e.g. cifar10-10k for one shard) apart from the full set")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, help="no-defense training epochs (default 20; 2 with --quick)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="method option (a JSON value, else a string), e.g. --set split_margin=0.6")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sanitize-bench"))
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--keep-scores", type=Path, metavar="DIR",
                        help="also write each defended cell's per-sample figures to DIR/<cell>.csv.gz (scores.csv, "
                             "the ground truth and the method's per-sample details), to study split rules offline")
    parser.add_argument("--quick", action="store_true",
                        help="--quick runs: a smoke test of the script, or a CPU benchmark with --arch small")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 2 if args.quick else 20
    return args


def main():
    args = parse_args()
    options = methods.parse_assignments(args.sets)
    options.update(arch=args.arch, quick=args.quick)
    records = json.loads(args.results.read_text()) if args.results.exists() else []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = read_dataset(args.test)
    failed = 0
    for rate in map(float, args.rates.split(",")):
        for attack_name in args.attacks.split(","):
            try:
                poisoned = prepare_data(args, attack_name, rate)
            except Exception:  # noqa: BLE001 - one broken attack must not cost the other cells their GPU time
                failed += 1
                traceback.print_exc()
                continue
            for method in args.methods.split(","):
                cell = {"dataset": args.dataset, "attack": attack_name, "rate": rate if attack_name != "none" else 0.0,
                        "method": method, "commit": args.commit, "options_id": options_id(method, options, args.epochs)}
                if any(all(r.get(k) == v for k, v in cell.items()) for r in records):
                    print("skip (done)", cell, flush=True)
                    continue
                try:
                    record = run_cell(args, method, poisoned, test, options, device)
                except Exception:  # noqa: BLE001 - reported, not recorded; the next cell still runs
                    failed += 1
                    print("FAILED", cell, file=sys.stderr, flush=True)
                    traceback.print_exc()
                    continue
                overrides = {} if method == "none" else {k: v for k, v in options.items() if k not in ("arch", "quick")}
                setting = {"arch": args.arch, **({"quick": True} if args.quick and method != "none" else {}),
                           **({"epochs": args.epochs} if method == "none" else {})}
                # the attacks' parameters as poisoned (defaults included), by attack name
                attack_record = {"attack_params": poisoned["params"]} if poisoned.get("params") else {}
                records.append({**cell, **record, **setting, **({"set": overrides} if overrides else {}),
                                **attack_record})
                args.results.write_text(json.dumps(records, indent=1))
                print(json.dumps(records[-1]), flush=True)
    if failed:
        raise SystemExit(f"{failed} cell(s) or attack(s) failed; see the tracebacks above")


def poisoned_bank(args, params: dict | None = None) -> tuple[Bank, np.ndarray, list]:
    """The calibration scripts' data, poisoned in memory: ``args.data`` (``--classes``, first ``--limit``
    samples) with ``args.attack`` (``attack_params``, then ``params``) at ``args.rate`` into TARGET (seed 0)
    on ``args.device``. Returns (bank, poisoned bool [N], [(attack, TARGET)]); for ``--attack none`` no
    sample is poisoned and the list is empty."""
    data = read_dataset(args.data, classes_file=args.classes)
    images, labels = data.images[:args.limit], data.labels[:args.limit]
    positive, attacks = np.zeros(len(labels), bool), []
    if args.attack != "none":
        attack = make_attack(args.attack, **{**attack_params(args.attack, TARGET, args.arch), **(params or {})})
        poisoned = attack.poison(images, labels, rate=args.rate, target=TARGET, seed=0, num_classes=len(data.classes))
        images, labels, positive, attacks = poisoned.images, poisoned.labels, poisoned.poisoned, [(attack, TARGET)]
    bank = Bank.from_arrays(images, labels, data.classes, device=train.resolve_device(args.device))
    train.configure_determinism()
    return bank, positive, attacks


def parse_variants(text: str, allowed: frozenset, what: str) -> list[dict]:
    """``--variants`` of the scripts that rerun a part of a method: a JSON list of option dicts, each
    changing only ``allowed`` options (``what`` names them in the error)."""
    try:
        variants = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--variants is not JSON: {error}") from None
    if not isinstance(variants, list) or not all(isinstance(variant, dict) for variant in variants):
        raise SystemExit("--variants must be a JSON list of option objects, e.g. '[{}, {\"lambda_u\": 75}]'")
    unknown = sorted({key for variant in variants for key in variant} - allowed)
    if unknown:
        raise SystemExit(f"variants may change {what} options only ({', '.join(sorted(allowed))}), not {unknown}")
    return variants


def options_id(method: str, options: dict, epochs: int = 20) -> str:
    """What tells two runs of one cell apart: the method's options, or the no-defense model's arch and epochs
    (the ResNet-18 for 20 epochs keeps the id it had before those were told apart)."""
    chosen = options
    if method == "none":
        chosen = {} if (options.get("arch"), epochs) == ("resnet18", 20) else {"arch": options.get("arch"),
                                                                               "epochs": epochs}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:10]


def prepare_data(args, attack_name: str, rate: float) -> dict:
    """Poisoned shards on disk (cached in --work by dataset, attack and rate, and reused only if poisoned
    with the same parameters: ``cached_truth``), their ground truth, the
    (attack, target) pairs and each attack's parameters as poisoned ({name: params}; none for ``none``).

    ``a+b`` applies attack ``a`` (target 0) and then ``b`` (target 1) to its output, each at
    ``rate``; a sample both picked counts once. The record's ASR is the larger of the two.
    """
    if attack_name == "none":
        return {"path": args.data, "truth": None, "attacks": []}
    source, poisoned_keys, truths, attacks, params, fresh = args.data, set(), [], [], {}, False
    for index, name in enumerate(attack_name.split("+")):
        # Cached per dataset, and for Label-Consistent per surrogate architecture too.
        surrogate = f"-{args.arch}" if name == "label_consistent" else ""
        out = args.work / "data" / args.dataset / f"{'+'.join(attack_name.split('+')[:index + 1])}-{rate}{surrogate}"
        target = TARGET + index
        wanted = {"params": make_attack(name, **attack_params(name, target, args.arch)).params, "rate": rate,
                  "target": target, "seed": index}
        # a copy poisoned on top of a fresh one is fresh too: its cached source is gone
        truth = None if fresh else cached_truth(out, wanted)
        if truth is None:
            fresh = True
            start = time.perf_counter()
            poison_dataset(source, attack=name, rate=rate, target=target, out=out, seed=index, overwrite=True,
                           **attack_params(name, target, args.arch))
            print(f"poisoned {name} {rate} (target {target}) in {time.perf_counter() - start:.1f}s", flush=True)
            truth = json.loads((out / "truth.json").read_text())
        poisoned_keys |= set(truth["poisoned"])
        truths.append(truth)
        attacks.append((make_attack(name, **truth["params"]), target))
        params[name] = truth["params"]
        source = out
    return {"path": source, "truth": {"poisoned": sorted(poisoned_keys), "true_labels": first_true_labels(truths)},
            "attacks": attacks, "params": params}


def first_true_labels(truths: list[dict]) -> dict[str, int]:
    """The poisons' true labels over the truth.json of copies poisoned one on top of the other, in that order:
    a sample several attacks picked keeps the label it had before the first."""
    found: dict[str, int] = {}
    for truth in truths:
        for key, label in truth["true_labels"].items():
            found.setdefault(key, label)
    return found


def cached_truth(out: Path, wanted: dict) -> dict | None:
    """The truth.json of a poisoned copy in ``out`` if it was made as ``wanted`` says (the attack's
    resolved ``params``, ``rate``, ``target``, ``seed``), else None: a copy poisoned with a parameter
    changed in code since is poisoned again, not reused."""
    try:
        truth = json.loads((out / "truth.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # through JSON, as truth.json stores them: tuples read back as lists
    return truth if all(truth.get(key) == value for key, value in json.loads(json.dumps(wanted)).items()) else None


def attack_params(attack_name: str, target: int, arch: str) -> dict:
    """What the benchmark sets beyond an attack's defaults. Label-Consistent's surrogate (the model its
    PGD runs against) runs on this machine's device with the benchmark's architecture: the ResNet-18
    on a GPU, the small CNN of a CPU benchmark (a ResNet-18 surrogate would take most of an hour on 2
    cores); its PGD budget is the DBD paper's (Table 2, eps 16/255 at a 2.5% rate, gpu_session.sh part 10),
    so that the cell sits beside its figures (the attack's own default is Turner et al.'s 8/255). TaCT's
    source class is the one after the target (the AdvrBD paper's Table I: source 0, target 1; its default
    source, 0, is our target)."""
    if attack_name == "label_consistent":
        return {"device": "cuda" if torch.cuda.is_available() else "cpu", "surrogate_arch": arch, "eps": 16 / 255}
    if attack_name == "tact":
        return {"source_classes": (target + 1,)}
    return {}


def run_cell(args, method: str, poisoned: dict, test, options: dict, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method == "none":
        model, timings, detection = train_without_defense(args, poisoned["path"], device), {}, {}
    else:
        out = args.work / "out" / f"{method}-{poisoned['path'].name}"
        # Stage lines with timestamps on stderr (the log): a run cut off by the device's time limit
        # still tells how far it got and how fast.
        progress = StageProgress(pipeline.stages(method))
        result = sanitize.run(poisoned["path"], method=method, out=out, device=device.type, overwrite=True,
                              progress=progress, **options)
        model, timings = result.model, result.timings_s
        scores = read_scores(out)
        if args.keep_scores:
            keep_scores(args.keep_scores / f"{poisoned['path'].name}-{method}-{options_id(method, options)}.csv.gz",
                        scores, poisoned["truth"], result.details)
        detection = {**detection_figures(scores, poisoned["truth"]),
                     "diagnostics": diagnostics(result, scores, poisoned["truth"]),
                     # The class the run's summary says the suspects point to (TARGET for the attacks
                     # here; none on the clean set), to check that pointer at full scale.
                     "suspect_target": result.suspect_target,
                     "options": result.manifest["options"]}  # as run, defaults resolved
    seconds = time.perf_counter() - start
    return {**evaluate(model, test, poisoned["attacks"], device), **detection, "seconds": round(seconds, 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "timings_s": timings}


def keep_scores(path: Path, scores: list[dict], truth: dict | None, details: dict) -> None:
    """scores.csv's columns less ``source``, ``poisoned`` (0/1) and each 1-D per-sample detail, one row a
    sample, gzipped (about 1 MB for 50,000 samples)."""
    poisoned_keys = set(truth["poisoned"]) if truth else set()
    columns = {name: np.asarray(values) for name, values in details.items()
               if np.ndim(values) == 1 and len(values) == len(scores)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "label", "score", "suspected", "relabel", "poisoned", *columns])
        for index, row in enumerate(scores):
            writer.writerow([row["key"], row["label"], row["score"], int(row["suspected"]), row["relabel"],
                             int(row["key"] in poisoned_keys), *(_cell(values[index]) for values in columns.values())])


def _cell(value):
    return int(value) if isinstance(value, (bool, np.bool_)) else value


def train_without_defense(args, path: Path, device: torch.device):
    ingested = read_dataset(path)
    bank = Bank.from_arrays(ingested.images, ingested.labels, ingested.classes, device)
    torch.manual_seed(0)
    model = train.prepare(build_model(args.arch, bank.num_classes, bank.image_size, bank.mean, bank.std), device)
    # The budget of the defended run's clean model: AdvrBD trains it at batch 512, 128 under --quick.
    train.train_supervised(model, bank, epochs=args.epochs, batch_size=128 if args.quick else 512, lr=0.2)
    return model


def evaluate(model, test, attacks: list, device: torch.device) -> dict:
    """ACC on the clean test set; ASR = share of triggered test samples not of the target class (of its
    source class for TaCT) predicted as the target (the largest over ``attacks``, [(attack, target)]; each is
    in ``asr_each``); ``clean_to_target``: the same share untriggered."""
    predict = train.predictor(model, device)
    predicted = predict(test.images)
    right = predicted == test.labels
    # by class too: where a defense flags much of one class (Blend's target on the H200), its accuracy is
    # what the clean model loses
    figures = {"acc": round(float(right.mean() * 100), 2), "asr": None,
               "acc_by_class": [round(float(right[test.labels == label].mean() * 100), 1) if
                                (test.labels == label).any() else None for label in range(len(test.classes))]}
    rates = [round(attack.success_rate(predict, test.images, test.labels, target, seed=1), 2)
             for attack, target in attacks]
    if rates:
        figures["asr"] = max(rates)
        # the ASR's floor: of the test images the ASR counts (``asr_mask``: TaCT's source class only), the
        # share the model calls the target untriggered (DBD's 72%-accurate model on the H100 called 2.9% of
        # the clean training images airplane, its ASR)
        figures["clean_to_target"] = max(
            round(float((predicted[attack.asr_mask(test.labels, target)] == target).mean() * 100), 2)
            for attack, target in attacks)
    if len(rates) > 1:
        figures["asr_each"] = rates
    return figures


def detection_figures(scores: list[dict], truth: dict | None) -> dict:
    """Recall and FPR of ``suspected`` and AUROC of ``score`` against the ground truth (0-100)."""
    poisoned_keys = set(truth["poisoned"]) if truth else set()
    return detection_rates(np.array([row["score"] for row in scores]), np.array([row["suspected"] for row in scores]),
                           np.array([row["key"] in poisoned_keys for row in scores]))


def detection_rates(score: np.ndarray, suspected: np.ndarray, is_poison: np.ndarray) -> dict:
    """{"recall", "fpr", "auroc"} in percent from per-sample arrays; recall and AUROC are None
    without poisons (the clean set: the FPR is then the share flagged)."""
    return {"recall": _percent(suspected[is_poison]), "fpr": _percent(suspected[~is_poison]),
            "auroc": percent_auroc(score, is_poison)}


def percent_auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """``auroc`` in percent, rounded; None without positives."""
    return round(100 * auroc(np.asarray(score, dtype=np.float64), positive), 2) if positive.any() else None


def _percent(selected: np.ndarray) -> float | None:
    """The share of True in ``selected`` in percent, rounded; None if it is empty."""
    return round(100 * float(selected.mean()), 2) if selected.size else None


def diagnostics(result, scores: list[dict], truth: dict | None) -> dict:
    """What each stage did, to tell a ranking failure from a threshold failure on one GPU run.

    The method's metrics (onnx check left out); with a ground truth, for each per-sample
    detail: a boolean set -> how many poisons it holds and its size; an integer ``*_round`` ->
    how many poisons have each round number 0, 1, ... (-1, none, is left out); a float -> the AUROC of
    the raw value against the poisons (far from 50 either way separates them; AdvrBD's warm-up
    KL is low on poisons, so near 0 is best there); and ``recall_at_fpr5``: the share of
    poisons scoring above the 95th percentile of the clean samples' scores. For AdvrBD, with or
    without a ground truth, ``split_at``: recall and FPR at other split margins. Always
    ``false_positives_by_label``: the flagged clean samples counted by their given label (a
    dirty-label attack's target class holding most of them says the method flags the class, not the poison).
    """
    found = {"metrics": {k: v for k, v in result.metrics.items() if k != "onnx_check"}}
    poisoned_keys = set(truth["poisoned"]) if truth else set()
    is_poison = np.array([row["key"] in poisoned_keys for row in scores])
    score = np.array([row["score"] for row in scores])
    labels = np.array([row["label"] for row in scores])
    flagged = np.array([row["suspected"] for row in scores])
    found["false_positives_by_label"] = by_label(labels[flagged & ~is_poison], len(result.manifest["input"]["classes"]))
    true = None
    if truth is not None and "true_labels" in truth:
        true = np.array([truth["true_labels"].get(row["key"], -1) for row in scores])
    doubt = result.details.get("relabel_doubt")
    found.update(relabeled_figures(labels, flagged, np.array([row["relabel"] for row in scores]), is_poison, true,
                                   None if doubt is None else np.asarray(doubt)))
    if "split_margin" in result.manifest.get("options", {}):
        found["split_at"] = split_at(score, is_poison)
    if truth is None:
        return found
    for name, values in result.details.items():
        values = np.asarray(values)
        if values.dtype == np.bool_:
            found[f"poisons_in_{name}"], found[f"{name}_size"] = int((values & is_poison).sum()), int(values.sum())
        elif name.endswith("_round") and np.issubdtype(values.dtype, np.integer):
            rounds = values[is_poison]
            found[f"poisons_by_{name}"] = [int((rounds == r).sum()) for r in range(int(values.max(initial=-1)) + 1)]
        elif np.issubdtype(values.dtype, np.floating):
            found[f"{name}_auroc"] = percent_auroc(values, is_poison)
    found["recall_at_fpr5"] = round(100 * float((score[is_poison] > np.quantile(score[~is_poison], 0.95)).mean()), 2)
    return found


# A suspect could keep its given label unless the clean model doubts it enough: 1 - the probability it gives
# that label (the methods' ``relabel_doubt`` detail). relabeled_figures reports the relabeled set under each.
DOUBT_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def relabeled_figures(labels: np.ndarray, suspected: np.ndarray, relabel: np.ndarray, is_poison: np.ndarray,
                      true: np.ndarray | None, doubt: np.ndarray | None = None) -> dict:
    """The relabeled set's labels (the clean model's for a suspect, the given one for the rest), in percent:
    ``clean_labels_changed``, of the clean samples (their given label is the dataset's: a change is for the
    worse); with poisons, ``poisons_keep_given``, of the poisons (a dirty-label poison that keeps its given
    label still teaches the backdoor), and with their ``true`` labels ``poisons_relabeled_true``. With the clean
    model's ``doubt`` in each given label, ``relabel_by_doubt``: the same figures had only the suspects it
    doubts by at least each of DOUBT_THRESHOLDS been relabeled, the others keeping their given label."""
    final = np.where(suspected, relabel, labels)
    found = {"clean_labels_changed": _percent((final != labels)[~is_poison])}
    if true is not None:
        found["poisons_relabeled_true"] = _percent((final == true)[is_poison])
    if is_poison.any():
        found["poisons_keep_given"] = _percent((final == labels)[is_poison])
    if doubt is not None:
        found["relabel_by_doubt"] = {str(threshold): relabeled_figures(labels, suspected & (doubt >= threshold),
                                                                       relabel, is_poison, true)
                                     for threshold in DOUBT_THRESHOLDS}
    return found


def by_label(labels: np.ndarray, num_classes: int) -> list[int]:
    """How many of ``labels`` are each class 0..K-1."""
    return np.bincount(labels, minlength=num_classes).tolist()


def split_at(score: np.ndarray, is_poison: np.ndarray) -> dict:
    """{margin: [recall, FPR]} had the split used that margin (AdvrBD: suspected = score > margin);
    recall is None without poisons (the clean set: the FPR is then the share flagged)."""
    return {str(m): [_percent((score > m)[is_poison]), _percent((score > m)[~is_poison])] for m in SPLIT_MARGINS}


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # Average ranks over ties so a constant score gives 0.5, not an arbitrary value.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2
    ranks[order] = np.repeat(average, counts)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


if __name__ == "__main__":
    main()
