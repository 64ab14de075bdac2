"""Command line: parse, call the library, print. Nothing else lives here.

Exit codes: 0 done; 2 a problem the user can fix (bad path, bad option, no GPU,
out of GPU memory, unusable input); 3 the exported model failed its onnxruntime
check (nothing was written); 130 interrupted; 143 terminated (SIGTERM).
"""
from __future__ import annotations

import json
import signal
import sys
import time
import unicodedata
from inspect import Parameter, signature
from pathlib import Path

import click

from sanitize import __version__, methods
from sanitize.formats.records import InputError, OnnxCheckError, skipped_text

EXIT_USER_ERROR = 2
EXIT_ONNX_CHECK = 3
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process the signal killed


class StageProgress:
    """Stage progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.

    Within a stage, ``advance(done, total)`` adds the steps (or rounds, or epochs) done and
    an estimate of the time the stage has left: redrawn at most every REDRAW_S on a
    terminal, a plain line at most every LINE_S otherwise (logs stay short).
    """

    REDRAW_S, LINE_S = 0.25, 30.0

    def __init__(self, stages: list[str], enabled: bool = True):
        self.stages, self.enabled = stages, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.name, self.stage_start, self.shown = "", self.start, self.start

    def stage(self, name: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        self.name, self.stage_start, self.shown = name, now, now
        position = self.stages.index(name) if name in self.stages else self.done
        self.done = position + 1
        if self.tty:
            self._draw(now, "")
        else:
            click.echo(f"[{now - self.start:7.1f}s] stage {position + 1}/{len(self.stages)}: {name}", err=True)

    def advance(self, done: int, total: int) -> None:
        if not self.enabled or done <= 0:
            return
        now = time.perf_counter()
        if now - self.shown < (self.REDRAW_S if self.tty else self.LINE_S) and done < total:
            return
        self.shown = now
        left = (now - self.stage_start) / done * (total - done)
        detail = f"{done}/{total}" + (f", ~{left:.0f}s left" if done < total else "")
        if self.tty:
            self._draw(now, detail)
        elif done < total:
            click.echo(f"[{now - self.start:7.1f}s]   {self.name} {detail}", err=True)

    def _draw(self, now: float, detail: str) -> None:
        width = 24
        filled = round(width * (self.done - 1) / max(1, len(self.stages)))
        bar = "#" * filled + "-" * (width - filled)
        label = f"{self.name} {detail}".strip()
        click.echo(f"\r[{bar}] {self.done}/{len(self.stages)} {label:<34} {now - self.start:7.1f}s", nl=False,
                   err=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            click.echo(err=True)


def _fail(message: str, code: int = EXIT_USER_ERROR):
    _say(f"sanitize: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sanitize")
def cli():
    """Find backdoor-poisoned samples in an image-classification dataset, with no trusted clean data."""


@cli.command()
@click.argument("data")
@click.option("--method", type=click.Choice(sorted(methods.REGISTRY)), default="advrbd", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (created).")
@click.option("--config", type=click.Path(dir_okay=False),
              help="TOML file of method options: top-level keys for every method, an [advrbd] or [dbd] table for one.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any method option, e.g. --set epsilon=0.03.")
@click.option("--arch", help="resnet18 (default), resnet34, mobilenetv2 or small.")
@click.option("--device", default="auto", show_default=True, help="auto, cuda, cuda:N or cpu.")
@click.option("--batch-size", type=int)
@click.option("--seed", type=int, help="Seed of every random choice (default 0, or the config file's).")
@click.option("--quick", is_flag=True,
              help="Scale every stage down (demos, tests, smoke runs); options you set keep their values.")
@click.option("--image-size", type=int, help="Working size in pixels (default: see README).")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False), help="classes.json for shards.")
@click.option("--workers", type=int,
              help="Processes that decode the input and write the shards (default: the CPUs available).")
@click.option("--shard-size", type=int, default=10_000, show_default=True)
@click.option("--relabeled-format", type=click.Choice(["webdataset", "imagefolder"]), default="webdataset",
              show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an earlier output (a directory with manifest.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def run(data, method, out, config, sets, arch, device, batch_size, seed, quick, image_size, classes_file, workers,
        shard_size, relabeled_format, overwrite, as_json, quiet):
    """Sanitize DATA (an ImageFolder root, a shard, a directory of shards or a brace pattern) into OUT."""
    from sanitize import pipeline

    options = methods.parse_assignments(sets)
    # The flags that set a method option. A flag given overrides the same option set with --set; one
    # left out does not count as set.
    option_flags = {"arch": arch, "batch_size": batch_size, "seed": seed, "quick": quick or None}
    # Checked here, not only in the pipeline: a --set name that is also a keyword of pipeline.run
    # (device, workers, out) must be refused as an option, not collide with the flag.
    flag_names = {param.name for param in click.get_current_context().command.params} - set(option_flags)
    flagged = sorted(set(options) & flag_names)
    if flagged:
        raise InputError(f"{flagged[0]} is not a method option but a flag: use --{flagged[0].replace('_', '-')}")
    methods.resolve_options(method, **options)  # every --set value checked, even one a flag then overrides
    options.update({k: v for k, v in option_flags.items() if v is not None})
    progress = StageProgress(pipeline.stages(method), enabled=not quiet)
    try:
        result = pipeline.run(data, method=method, out=out, config=config, device=device, image_size=image_size,
                              classes_file=classes_file, workers=workers, shard_size=shard_size,
                              relabeled_format=relabeled_format, overwrite=overwrite, progress=progress,
                              **options)
    finally:
        progress.close()
    _report(result, as_json)


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@click.option("--suspects", "show", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many suspects to list.")
def inspect(out, as_json, show):
    """Print the audit of an existing output directory OUT."""
    from sanitize import pipeline
    from sanitize.formats import read_manifest

    result = pipeline.summarise(read_manifest(Path(out)), Path(out))
    _report(result, as_json, show)


@cli.command()
@click.argument("method", type=click.Choice(sorted(methods.REGISTRY)), metavar="METHOD")
@click.option("--json", "as_json", is_flag=True, help="Print the options as JSON.")
def options(method, as_json):
    """List METHOD's options (for --set KEY=VALUE or --config FILE.toml) with their defaults."""
    rows = methods.describe(method)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    kinds = max(16, *(len(row["type"]) for row in rows))
    click.echo(f"{'option':<{width}}  {'type':<{kinds}}  {'default':<12}  {'range':<14}  under --quick")
    for row in rows:
        quick = "" if row["quick"] == row["default"] else _value(row["quick"])
        click.echo(f"{row['name']:<{width}}  {row['type']:<{kinds}}  {_value(row['default']):<12}  "
                   f"{row['range']:<14}  {quick}".rstrip())


def _value(value) -> str:
    """An option's value as it is written after --set."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@cli.command()
@click.argument("data")
@click.option("--attack", required=True, help="badnets, blend, sig, wanet, physicalba, tact, adaptive_blend, ...")
@click.option("--rate", type=float, required=True, help="Fraction of the dataset to poison, e.g. 0.05.")
@click.option("--target", default="0", show_default=True, help="Target class: an index or a class name.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["webdataset", "imagefolder"]), help="Default: as the input.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any attack parameter.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier poisoned copy (a directory with truth.json).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def poison(data, attack, rate, target, out, seed, fmt, sets, overwrite, quiet):
    """Write a poisoned copy of DATA to OUT plus truth.json (for red-teaming; DATA is not modified)."""
    from sanitize.attacks import poison_dataset
    from sanitize.attacks.poison import poison_stages

    params = methods.parse_assignments(sets)
    own = {name for name, p in signature(poison_dataset).parameters.items() if p.kind is not Parameter.VAR_KEYWORD}
    taken = sorted(set(params) & own)
    if taken:  # --set seed=3 would collide with --seed in the call below
        flag = {"data": "the DATA argument", "fmt": "--format"}.get(taken[0], f"--{taken[0]}")
        raise InputError(f"--set takes the attack's parameters, not {taken[0]}: use {flag}")
    progress = StageProgress(poison_stages(attack), enabled=not quiet)
    try:
        truth = poison_dataset(data, attack=attack, rate=rate, target=target, out=out, seed=seed, fmt=fmt,
                               overwrite=overwrite, progress=progress, **params)
    finally:
        progress.close()
    counts = truth["counts"]
    _say(f"poisoned {counts['poisoned']} of {counts['readable']} readable samples with {attack} "
         f"(target class {truth['target']}, {truth['target_class']!r}); copy and truth.json in {out}")
    if truth["renamed"]:
        moved = sum(key in truth["renamed"] and label != truth["target"] for key, label in truth["true_labels"].items())
        parts = [f"{moved} poisons moved into the folder of their new label"] if moved else []
        if len(truth["renamed"]) > moved:  # shards written as a tree, or class names unsafe as folder names
            parts.append(f"{len(truth['renamed']) - moved} {'other ' if moved else ''}keys changed with the "
                         f"copy's class folders")
        _say(f"  {', '.join(parts)}; truth.json maps new keys to old under 'renamed'")
    for warning in truth["warnings"]:
        _say(f"warning: {warning}", err=True)


@cli.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True)
def demo(out, device):
    """Poison the shipped CIFAR-10 sample with a BadNets patch, sanitize it, and score the result."""
    from sanitize import pipeline
    from sanitize.demo import run_demo

    progress = StageProgress(pipeline.stages("advrbd"))
    try:
        run_demo(Path(out), device=device, echo=click.echo, progress=progress)
    finally:
        progress.close()


def _report(result, as_json: bool, show: int = 5) -> None:
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    counts = result.counts
    _say(f"sanitize {result.method}: {counts['total']} samples -> clean {counts['clean']}, "
         f"suspected {counts['suspected']}, unreadable {counts['unreadable']}")
    note = _by_design(result.method, result.manifest)
    if note:
        _say(note)
    if result.suspect_target:
        target = result.suspect_target
        # Most of them keeping the class: on the H200, AdvrBD's clean model gave 0.15% of BadNets-at-20%'s
        # airplane suspects another label, having learned the backdoor from the poisons the split missed (its
        # attack success stayed 96.7%); a clean-label attack and a class's hard images look the same here.
        kept = (f": hard or memorised {target['class']!r} images, a clean-label backdoor, or a backdoor the "
                f"clean model learned from poisons the split missed (then model.onnx carries it too)"
                if target["relabeled_away"] < 0.5 else "")
        _say(f"  suspects point to class {target['class']!r}: {target['share']:.0%} of suspects carry it, "
             f"{target['lift']:.1f}x its share of the data; the clean model gives "
             f"{target['relabeled_away']:.0%} of those another label{kept}")
    _say("  suspected per class: " + per_class_line(result.per_class))
    classes = result.manifest["input"]["classes"]
    for suspect in result.manifest["suspects"][:show]:
        _say(f"    {suspect['score']:+.3f}  {suspect['key']}  {classes[suspect['label']]} -> "
             f"{classes[suspect['relabel']]}")
    if result.manifest["unreadable"]:
        _say(f"  unreadable: {len(result.manifest['unreadable'])} (reasons in manifest.json)")
    skipped = result.manifest["input"].get("skipped") or {}
    if skipped:  # files that are not samples (not images, hidden, links that leave the root, ...)
        _say(f"  skipped files: {skipped_text(skipped)}")
    for warnings, where in ((result.warnings, "warnings"), (result.input_warnings, "input/warnings")):
        for warning in warnings[:WARNINGS_SHOWN]:
            _say(f"warning: {warning}", err=True)
        if len(warnings) > WARNINGS_SHOWN:
            _say(f"warning: {len(warnings) - WARNINGS_SHOWN} more in manifest.json ({where})", err=True)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items())
    _say(f"  time: {times}")
    _say(f"  outputs in {result.out}/: " + ", ".join(sorted(result.outputs.values())))


def _by_design(method: str, manifest: dict) -> str | None:
    """What the counts mean where the method flags a share of the data by design, not by evidence: DBD's
    filter labels ``filter_ratio`` of the data and suspects the rest, poisoned or not, so the relabeled set
    holds the clean model's label for about half of any dataset, right or wrong."""
    if method != "dbd":
        return None
    options = manifest["options"]
    kept = f"{options['filter_ratio']:.0%} of " + ("each class" if options.get("filter_by_class") else "the data")
    changed = sum(suspect["relabel"] != suspect["label"] for suspect in manifest["suspects"])
    return (f"  dbd keeps {kept} as clean and suspects the rest by design: a suspect is not trusted, not "
            f"necessarily poisoned. clean/ holds the rest with their given labels; relabeled/ gives every suspect "
            f"the clean model's label ({changed} of {len(manifest['suspects'])} changed), as right as that model is")


def _say(text: str, err: bool = False) -> None:
    """``click.echo`` of one line of a summary or an error, ``terminal_safe``."""
    click.echo(terminal_safe(text), err=err)


# Control characters, invisible formatting (U+202E, the right-to-left override, is one) and line or
# paragraph separators: in a class name, key or path, they would break a line or reorder what it shows.
_UNSAFE_ON_TERMINAL = ("Cc", "Cf", "Zl", "Zp")


def terminal_safe(text: str) -> str:
    """``text`` with every character of ``_UNSAFE_ON_TERMINAL`` as an escape (``\\n``, ``\\u202e``): names
    come from the data, and data must not rewrite what the terminal shows."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in
                   _UNSAFE_ON_TERMINAL else char for char in text)


# The summary prints this many of the manifest's input warnings (damaged shards, renamed duplicates, ...).
WARNINGS_SHOWN = 5
# Beyond this many classes the per-class line lists only the classes with the most suspects.
PER_CLASS_SHOWN = 10


def per_class_line(per_class: dict[str, dict[str, int]], shown: int = PER_CLASS_SHOWN) -> str:
    """"name suspected/total, ..." for every class, or, past ``shown`` classes, for the (at most
    ``shown``) classes with the most suspects and one total for the rest: one screen for any K."""
    if len(per_class) <= shown:
        return ", ".join(f"{name} {row['suspected']}/{row['total']}" for name, row in per_class.items())
    ranked = sorted(per_class, key=lambda name: -per_class[name]["suspected"])
    named = [name for name in ranked[:shown] if per_class[name]["suspected"]]
    if not named:
        return f"none in all {len(per_class)} classes"
    rest = [per_class[name] for name in ranked if name not in named]
    return ", ".join([f"{name} {per_class[name]['suspected']}/{per_class[name]['total']}" for name in named]
                     + [f"{sum(row['suspected'] for row in rest)}/{sum(row['total'] for row in rest)} in the "
                        f"{len(rest)} other classes"])


class Terminated(Exception):
    """SIGTERM (``kill``, a job scheduler's time limit), raised in the main thread so that the
    staged output is cleaned up as on Ctrl-C, instead of the process dying with it left behind."""


def _terminate(signum, frame):
    raise Terminated


def main(argv=None) -> None:
    """Entry point: user errors are one line on stderr and a non-zero exit, never a traceback.

    Torch is imported inside the ``try`` (by the command that needs it), so that Ctrl-C while it
    loads, a second or so, is "interrupted" too."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="sanitize", standalone_mode=False)
    except Terminated:
        _fail("terminated", EXIT_TERMINATED)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except InputError as error:
        _fail(str(error))
    except OnnxCheckError as error:
        _fail(f"{error}; no output was written", EXIT_ONNX_CHECK)
    except OSError as error:  # the file system refused (disk full, a permission taken away mid-run)
        _fail(f"file system error: {error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
