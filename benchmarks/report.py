"""Turn benchmarks/results.json into the tables of RESULTS.md and an ACC-vs-ASR plot.

    python benchmarks/report.py [--results benchmarks/results.json] [--markdown benchmarks/RESULTS.md]
                                [--papers benchmarks/papers.json]

The tables replace whatever sits between the ``<!-- results:begin -->`` and
``<!-- results:end -->`` markers of the markdown file; the text around them (the
commands, the notes) is written by hand. Each defended run is checked against the
targets of its method, with the no-defense run of the same attack and rate (same
commit preferred) as the reference.

``papers.json`` holds the CIFAR-10 figures the AdvrBD and DBD papers print (one
record per paper table, attack and defense); they are written as tables of their
own, and each of our runs with a published AdvrBD, DBD or no-defense figure for its
attack is set beside it.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
CLEAN_LABEL = {"sig", "label_consistent"}
COLOURS = {"none": "#888888", "advrbd": "#d62728", "dbd": "#1f77b4"}
PAPERS = {"advrbd": "AdvrBD", "dbd": "DBD"}

# method -> (max ASR, max ACC drop vs no defense, max seconds); detection targets below.
TARGETS = {"advrbd": (1.0, 2.0, 90.0), "dbd": (1.0, 3.0, 600.0)}
DIRTY_RECALL, DIRTY_FPR = 98.0, 5.0  # AdvrBD, dirty-label attacks
CLEAN_SET_FLAGGED, CLEAN_SET_ACC_DROP = 5.0, 1.0  # AdvrBD, no attack


def missed_targets(record: dict, baseline: dict | None) -> list[str]:
    """The targets ``record`` misses (empty: all met); ``baseline`` is the no-defense run beside it."""
    method = record["method"]
    if method not in TARGETS:
        return []
    max_asr, max_drop, max_seconds = TARGETS[method]
    missed = []
    clean_set = record["attack"] == "none"
    if clean_set and method == "advrbd":
        max_drop = CLEAN_SET_ACC_DROP
        if record["fpr"] is not None and record["fpr"] > CLEAN_SET_FLAGGED:
            missed.append(f"flagged {record['fpr']:.1f}% > {CLEAN_SET_FLAGGED:g}%")
    if not on_gpu(record):
        max_seconds = None  # the time targets are an H100's; a CPU run is there to show what it delivers
    if record["asr"] is not None and record["asr"] > max_asr:
        missed.append(f"ASR {record['asr']:.1f} > {max_asr:g}")
    if baseline is None:
        missed.append("no no-defense run to compare ACC with")
    elif baseline["acc"] - record["acc"] > max_drop:
        missed.append(f"ACC {baseline['acc'] - record['acc']:.1f} pts below no defense (> {max_drop:g})")
    dirty = not clean_set and not any(part in CLEAN_LABEL for part in record["attack"].split("+"))
    if method == "advrbd" and dirty and record["recall"] is not None:
        if record["recall"] < DIRTY_RECALL:
            missed.append(f"recall {record['recall']:.1f} < {DIRTY_RECALL:g}")
        if record["fpr"] > DIRTY_FPR:
            missed.append(f"FPR {record['fpr']:.1f} > {DIRTY_FPR:g}")
    if max_seconds is not None and record["seconds"] > max_seconds:
        missed.append(f"{record['seconds']:.0f} s > {max_seconds:g} s")
    return missed


def on_gpu(record: dict) -> bool:
    return record.get("device") != "cpu"


def arch(record: dict) -> str:
    return record.get("arch", "resnet18")  # records before the field were all ResNet-18


def find_baseline(record: dict, records: list[dict]) -> dict | None:
    """The no-defense run of the same attack, rate, model and kind of device (same commit preferred)."""
    same = [r for r in records if r["method"] == "none" and r["attack"] == record["attack"]
            and r["rate"] == record["rate"] and r["dataset"] == record["dataset"]
            and arch(r) == arch(record) and on_gpu(r) == on_gpu(record)]
    same.sort(key=lambda r: r.get("commit") != record.get("commit"))  # same commit first
    return same[0] if same else None


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def label(record: dict) -> str:
    """The method, with any ``--set`` overrides the run was made with. AdvrBD's detection
    augmentation is named from the options as run, set or not: its default has changed
    between runs (off until 895dc9b, where ``detect_augment=true`` meant the crop); the
    enhancement's, where it differs."""
    shown, options = dict(record.get("set") or {}), record.get("options") or {}
    if options.get("detect_augment") is not None:
        shown["detect_augment"] = options["detect_augment"]
        if options.get("enhance_augment", options["detect_augment"]) != options["detect_augment"]:
            shown["enhance_augment"] = options["enhance_augment"]
    quick = " --quick" if record.get("quick") else ""
    standard = (record.get("arch", "resnet18"), record.get("epochs")) == ("resnet18", 20)  # the GPU rows' model
    shown_epochs = record.get("epochs") and record["method"] == "none" and not standard
    epochs = f" {record['epochs']} epochs" if shown_epochs else ""
    return (record["method"] + quick + epochs
            + "".join(f" {key}={_bare(value)}" for key, value in sorted(shown.items())))


def _bare(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def ordered(records: list[dict]) -> list[dict]:
    order = {"none": 0, "advrbd": 1, "dbd": 2}
    return sorted(records, key=lambda r: (r["rate"], r["attack"], order.get(r["method"], 9), r.get("commit", "")))


def table(records: list[dict], everything: list[dict] | None = None) -> str:
    """The runs' figures, each defended run checked against a no-defense run among ``everything``
    (default: ``records``)."""
    everything = records if everything is None else everything
    # "to target untriggered": of the test images the ASR counts (outside the target class; TaCT: its
    # source class), the share the model calls the target without a trigger (bench.evaluate's
    # clean_to_target), the floor under the ASR.
    columns = ("attack", "rate", "method", "ACC", "ASR", "to target untriggered", "recall", "FPR", "AUROC",
               "seconds", "peak GB", "targets", "device", "commit")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in ordered(records):
        missed = missed_targets(r, find_baseline(r, everything))
        verdict = "" if r["method"] == "none" else ("met" if not missed else "missed: " + "; ".join(missed))
        lines.append(f"| {r['attack']} | {100 * r['rate']:g}% | {label(r)} | {fmt(r['acc'])} | {fmt(r['asr'])} | "
                     f"{fmt(r.get('clean_to_target'))} | {fmt(r.get('recall'))} | {fmt(r.get('fpr'))} | "
                     f"{fmt(r.get('auroc'))} | {fmt(r['seconds'], 0)} | "
                     f"{fmt(r.get('peak_mem_gb'), 2)} | {verdict} | {r['device']} | {r.get('commit', '')[:7]} |")
    return "\n".join(lines)


def cpu_tables(cpu: list[dict], records: list[dict]) -> str:
    """The runs made on a CPU (no GPU at hand: a small model, ``--quick``), apart from the GPU runs they
    must not be compared with; the targets are checked but for time, which is an H100's."""
    parts = []
    for dataset in dict.fromkeys(r["dataset"] for r in cpu):  # a subset of the shards gets tables of its own
        runs = [r for r in cpu if r["dataset"] == dataset]
        models = ", ".join(dict.fromkeys(f"`{arch(r)}`" for r in runs))
        parts += [f"### On a CPU ({models}{'' if dataset == 'cifar10' else f', {dataset}'})",
                  table(runs, records), stage_table(runs), diagnostics_table(runs)]
    return "\n\n".join(part for part in parts if part)


def stage_table(records: list[dict]) -> str:
    timed = [r for r in ordered(records) if r.get("timings_s")]
    if not timed:
        return ""
    stages = list(dict.fromkeys(stage for r in timed for stage in r["timings_s"]))
    lines = ["| attack | rate | method | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for r in timed:
        lines.append(f"| {r['attack']} | {100 * r['rate']:g}% | {label(r)} | "
                     + " | ".join(fmt(r["timings_s"].get(stage)) for stage in stages) + " |")
    return "Wall time per stage (seconds):\n\n" + "\n".join(lines)


def diagnostics_table(records: list[dict]) -> str:
    """What each defense stage did, for the runs that recorded it (see bench.diagnostics)."""
    shown = [r for r in ordered(records) if r.get("diagnostics", {}).keys() - {"metrics"}]
    if not shown:
        return ""
    lines = ["| attack | rate | method | warm-up KL AUROC | poisons in unlearn set (by round) | unlearn set | "
             "clean rest fit per round (%) | recall at 5% FPR | "
             "recall/FPR had the split margin been 0 · 0.3 · 0.5 · 0.7 · 0.9 | "
             "relabeled set: clean labels changed · poisons given their true label (%) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        d = r["diagnostics"]
        rounds = d.get("poisons_by_unlearn_round")
        fits = d["metrics"].get("rest_fit_history") or []
        lines.append(f"| {r['attack']} | {100 * r['rate']:g}% | {label(r)} | {fmt(d.get('warmup_kl_auroc'))} | "
                     f"{d.get('poisons_in_unlearn', '–')}{f' ({rounds})' if rounds else ''} | "
                     f"{d.get('unlearn_size', '–')} | {' '.join(f'{100 * f:.0f}' for f in fits) or '–'} | "
                     f"{fmt(d.get('recall_at_fpr5'))} | {split_cell(d.get('split_at'))} | "
                     f"{relabeled_cell(d)} |")
    return ("Detection diagnostics (AdvrBD: a warm-up KL AUROC near 0 means the poisons were the most robust; "
            "the clean rest fit should fall round by round):\n\n" + "\n".join(lines))


def split_cell(split: dict | None) -> str:
    if not split:
        return "–"
    return " · ".join(f"{fmt(recall, 0)}/{fmt(fpr, 1)}" for recall, fpr in split.values())


def relabeled_cell(diagnostics: dict) -> str:
    """"changed · restored" of the relabeled set (bench.diagnostics), – for runs recorded before it counted them."""
    changed, restored = diagnostics.get("clean_labels_changed"), diagnostics.get("poisons_relabeled_true")
    if changed is None:
        return "–"
    return f"{fmt(changed)} · {fmt(restored)}" if restored is not None else fmt(changed)


def paper_setting(paper: dict) -> str:
    """What sets a published figure apart beyond attack and defense: the defense variant, the attack's eps."""
    parts = [paper["variant"]] if paper.get("variant") else []
    if paper.get("epsilon") is not None:
        parts.append(f"eps {paper['epsilon']}/255")
    return ", ".join(parts)


def published_cell(paper: dict, notes: list[str]) -> str:
    marker = f" [{notes.index(paper['note']) + 1}]" if paper.get("note") else ""
    return f"{fmt(paper['acc'], 2)} / {fmt(paper['asr'], 2)}{marker}"


def published_tables(papers: list[dict]) -> str:
    """The papers' CIFAR-10 figures as printed, one table per paper table: defenses down, attacks across."""
    papers = [p for p in papers if p["dataset"] == "cifar10"]
    if not papers:
        return ""
    notes = list(dict.fromkeys(p["note"] for p in papers if p.get("note")))
    parts = ["### Published figures (CIFAR-10)",
             "From `papers.json`. Cells: ACC / ASR (%) as the paper prints them (DBD calls ACC 'BA'; – where "
             "lost); `[n]`: note n below the tables."]
    for paper, number in dict.fromkeys((p["paper"], p["table"]) for p in papers):
        shown = [p for p in papers if p["paper"] == paper and p["table"] == number]
        cells = {}  # (defense, variant) -> {(attack, rate, eps): cell}
        for p in shown:
            row = cells.setdefault((p["paper_defense"], p.get("variant")), {})
            row[p["attack"], p["rate"], p.get("epsilon")] = published_cell(p, notes)
        columns = list(dict.fromkeys(column for row in cells.values() for column in row))
        models = ", ".join(dict.fromkeys(str(p["model"]) for p in shown))
        targets = ", ".join(dict.fromkeys(str(p["target"]) for p in shown))
        heads = [f"{attack} ({100 * rate:g}%{'' if eps is None else f', eps {eps}/255'})"
                 for attack, rate, eps in columns]
        lines = [f"{PAPERS.get(paper, paper)} Table {number}; model {models}, target class {targets}:", "",
                 "| defense | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for (defense, variant), row in cells.items():
            name = defense + (f" ({variant})" if variant else "")
            lines.append(f"| {name} | " + " | ".join(row.get(column, "") for column in columns) + " |")
        parts.append("\n".join(lines))
    if notes:
        parts.append("\n".join(f"- [{index}] {note}" for index, note in enumerate(notes, 1)))
    return "\n\n".join(parts)


def published_for(record: dict, papers: list[dict]) -> list[dict]:
    """The papers' figures for ``record``'s attack, rate and method (AdvrBD, DBD or no defense); a figure
    printed in several tables comes once, with all of them in ``tables`` (and their variants in ``variant``)."""
    if record["method"] not in ("none", *PAPERS):
        return []
    merged = {}
    for p in papers:
        if (p["dataset"], p["attack"], p["defense"]) == (record["dataset"], record["attack"], record["method"]) \
                and math.isclose(p["rate"], record["rate"]):
            key = (p["paper"], p.get("epsilon"), p["acc"], p["asr"])  # the rate is the record's
            entry = merged.setdefault(key, {**p, "tables": [], "variant": None})
            entry["tables"].append(p["table"])
            if p.get("variant") and p["variant"] != entry["variant"]:
                entry["variant"] = p["variant"] if entry["variant"] is None else f"{entry['variant']} / {p['variant']}"
    return list(merged.values())


def latest(records: list[dict]) -> list[dict]:
    """The last run (in ``records``' order) of each cell, model and setting: a rerun stands for the runs it
    repeats where one row of ours is set beside the papers'."""
    last = {}
    for r in records:
        last[r["dataset"], r["attack"], r["rate"], arch(r), label(r)] = r
    return list(last.values())


def comparison_table(records: list[dict], papers: list[dict]) -> str:
    """Our ACC / ASR beside the papers' for the same attack and method (the latest run of each setting)."""
    lines = []
    for r in ordered(latest(records)):
        for p in published_for(r, papers):
            lines.append(f"| {r['attack']} | {100 * r['rate']:g}% | {label(r)} | {fmt(r['acc'])} | "
                         f"{fmt(r['asr'])} | {PAPERS.get(p['paper'], p['paper'])} {', '.join(p['tables'])} | "
                         f"{paper_setting(p)} | {100 * p['rate']:g}% | {p['target']} | {fmt(p['acc'], 2)} | "
                         f"{fmt(p['asr'], 2)} |")
    if not lines:
        return ""
    return ("### Ours beside the papers (CIFAR-10)\n\n"
            "Our target class is 0; the papers' triggers, targets and training differ (see the published tables).\n\n"
            "| attack | rate | method | ACC | ASR | paper, table | paper's setting | paper's rate | paper's target | "
            "paper's ACC | paper's ASR |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines))


def svg_plot(records: list[dict], width: int = 520, height: int = 360) -> str:
    """ACC (y) against ASR (x), one dot per run, coloured by method."""
    left, bottom, right, top = 50, 40, 20, 20
    plotted = [r for r in records if r["asr"] is not None]
    accs = [r["acc"] for r in plotted] or [0.0]
    low, high = max(0.0, min(accs) - 5), min(100.0, max(accs) + 2)

    def x(asr):
        return left + asr / 100 * (width - left - right)

    def y(acc):
        return height - bottom - (acc - low) / max(1e-9, high - low) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{(width + left) / 2}" y="{height - 8}" text-anchor="middle">ASR (%)</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" '
             'text-anchor="middle">ACC (%)</text>']
    for tick in range(0, 101, 20):
        parts.append(f'<text x="{x(tick)}" y="{height - bottom + 14}" text-anchor="middle">{tick}</text>')
    for tick in (low, (low + high) / 2, high):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4}" text-anchor="end">{tick:.0f}</text>')
    for r in plotted:
        colour = COLOURS.get(r["method"], "black")
        parts.append(f'<circle cx="{x(r["asr"]):.1f}" cy="{y(r["acc"]):.1f}" r="4" fill="{colour}"/>'
                     f'<text x="{x(r["asr"]) + 6:.1f}" y="{y(r["acc"]) + 4:.1f}" fill="{colour}">{r["attack"]}</text>')
    for index, (method, colour) in enumerate(COLOURS.items()):
        parts.append(f'<circle cx="{width - 90}" cy="{top + 8 + 16 * index}" r="4" fill="{colour}"/>'
                     f'<text x="{width - 80}" y="{top + 12 + 16 * index}">{method}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def merged(records: list[dict], additions: list[list[dict]]) -> list[dict]:
    """``records`` plus every added record not already among them (the same run added twice counts once)."""
    seen = {json.dumps(r, sort_keys=True) for r in records}
    result = list(records)
    for record in (r for added in additions for r in added):
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            result.append(record)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=HERE / "acc_vs_asr.svg")
    parser.add_argument("--papers", type=Path, default=HERE / "papers.json", help="the papers' published figures")
    parser.add_argument("--add", type=Path, action="append", default=[], metavar="FILE",
                        help="results.json from a GPU run: its new records are appended to --results first")
    args = parser.parse_args()
    records = json.loads(args.results.read_text()) if args.results.exists() else []
    if args.add:
        records = merged(records, [json.loads(path.read_text()) for path in args.add])
        args.results.write_text(json.dumps(records, indent=1) + "\n")
    papers = json.loads(args.papers.read_text()) if args.papers.exists() else []
    gpu = [r for r in records if on_gpu(r)]
    cpu = [r for r in records if not on_gpu(r)]
    body = table(gpu) if gpu else "No GPU runs recorded yet."
    parts = (body, comparison_table(gpu, papers), stage_table(gpu), diagnostics_table(gpu),
             f"![ACC against ASR]({args.plot.name})", cpu_tables(cpu, records),
             published_tables(papers))
    generated = "\n\n".join(part for part in parts if part)
    text = args.markdown.read_text() if args.markdown.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.markdown} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    args.markdown.write_text(f"{head}{BEGIN}\n{generated}\n{END}{rest.split(END, 1)[1]}")
    args.plot.write_text(svg_plot(gpu))
    print(f"wrote {args.markdown} and {args.plot} from {len(records)} runs")


if __name__ == "__main__":
    main()
