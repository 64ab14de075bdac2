"""ingest -> bank -> method -> outputs: the only place that wires the layers together.

``run`` is the whole product in one call; ``sanitize run`` only parses flags and
prints what this returns.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import inspect
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sanitize import __version__, methods, train
from sanitize.data import Bank
from sanitize.formats import build_manifest, read_dataset, staged_output, write_manifest, write_outputs
from sanitize.formats.onnx import check_onnx, export_onnx
from sanitize.formats.records import InputError
from sanitize.methods.base import MethodResult, StageClock

# Real samples the ONNX parity check runs on: enough to catch a wrong graph, cheap on CPU.
ONNX_CHECK_SAMPLES = 256


@dataclass
class RunResult:
    """What a run did: counts, where the outputs are (``outputs``: paths relative to ``out``, as in the
    manifest; ``result.out / result.outputs["scores"]``), per-stage timings and metrics."""

    out: Path
    method: str
    counts: dict[str, int]
    per_class: dict[str, dict[str, int]]
    suspect_target: dict | None  # the class the suspects point to, if any (see suspect_target())
    outputs: dict[str, str]
    timings_s: dict[str, float]
    metrics: dict
    manifest: dict = field(repr=False)
    model: torch.nn.Module | None = field(default=None, repr=False)  # the clean model (None from inspect)
    # The method's per-sample diagnostics ([N] arrays in scores.csv row order; empty from inspect).
    details: dict = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)  # the method's about its verdicts (manifest "warnings")
    input_warnings: list[str] = field(default_factory=list)  # the reader's and writers' (manifest input.warnings)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("manifest", "model", "details")}
        data["out"] = str(self.out)
        return data


class Progress:
    """Receives stage names as a run goes, and steps within a stage; subclass to show them (the CLI does)."""

    def stage(self, name: str) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        """``done`` of ``total`` steps (or rounds) of the current stage; called often, so keep it cheap."""


def stages(method: str) -> list[str]:
    """The stage names a run of ``method`` reports to its progress, in order."""
    module, _ = methods.load(method)
    return ["ingest", *module.STAGES, "write", "export"]


def run(data, method: str = "advrbd", out=None, *, config=None, device: str = "auto", seed: int | None = None,
        image_size=None, classes_file=None, workers: int | None = None, shard_size: int = 10_000,
        relabeled_format: str = "webdataset", overwrite: bool = False, progress: Progress | None = None,
        **method_options) -> RunResult:
    """Sanitize ``data`` (ImageFolder root or WebDataset shards) into the directory ``out``.

    ``method_options`` are the method's own options (``arch``, ``quick``,
    ``batch_size``, ...) and ``seed``; they override ``config`` (a TOML file), which overrides
    the method's defaults (None: not set). Raises :class:`InputError` for anything the user can fix.
    """
    if out is None:
        raise InputError("an output directory is required (--out)")
    if relabeled_format not in ("webdataset", "imagefolder"):
        raise InputError(f"--relabeled-format must be webdataset or imagefolder, not {relabeled_format!r}")
    shard_size = methods.coerce("--shard-size", shard_size, int)
    if shard_size < 1:
        raise InputError("--shard-size must be at least 1")
    workers = None if workers is None else methods.coerce("--workers", workers, int)
    if workers is not None and workers < 1:
        raise InputError("--workers must be at least 1")
    progress = progress or Progress()
    options = _method_options(method, config, seed, method_options)
    module, _ = methods.load(method)
    torch_device = train.resolve_device(device)
    clock = StageClock(torch_device, progress)
    started = time.perf_counter()
    with train.deterministic(torch_device), staged_output(out, data, overwrite=overwrite) as staging:
        with clock("ingest"):
            ingested = read_dataset(data, classes_file=classes_file, image_size=image_size, workers=workers)
        bank = _load_bank(ingested, torch_device)
        result = _guard_memory(lambda: module.run(bank, options, progress))
        _check_result(result, bank.n)
        # The shards are written (by worker processes) while this thread exports and checks
        # the model: the two share nothing but the staging folder. Both stages are announced from
        # this thread, so that progress shows them in order.
        with concurrent.futures.ThreadPoolExecutor(1) as side:
            progress.stage("write")
            writing = side.submit(_timed, write_outputs, staging, ingested, score=result.score,
                                  suspected=result.suspected, relabel=result.relabel, shard_size=shard_size,
                                  relabeled_format=relabeled_format, workers=workers)
            with clock("export"):
                onnx_report = _export(result, bank, staging / "model.onnx", method)
            outputs, clock.timings_s["write"] = writing.result()
        outputs["model"] = "model.onnx"
        metrics = {**result.metrics, "onnx_check": onnx_report}
        manifest = build_manifest(
            ingested, method=method, options=_jsonable(dataclasses.asdict(options)), seed=options.seed,
            score=result.score, suspected=result.suspected, relabel=result.relabel,
            model={"file": "model.onnx", "arch": options.arch, "input_size": list(bank.image_size)},
            timings_s=_stage_order(clock.timings_s, result.timings_s, time.perf_counter() - started),
            environment=_environment(torch_device), metrics=metrics, warnings=result.warnings)
        write_manifest(staging, manifest)
        outputs["manifest"] = "manifest.json"
    return dataclasses.replace(summarise(manifest, Path(out), outputs), model=result.model, details=result.details)


def _method_options(method: str, config, seed, method_options: dict):
    """``methods.resolve_options``; a name that is neither the method's option nor ``run``'s own argument
    is answered with both lists (``classes=`` for ``classes_file=`` said only the method's)."""
    try:
        return methods.resolve_options(method, config, seed=seed, **method_options)
    except InputError as error:
        if not str(error).startswith("unknown option"):
            raise
        own = [name for name, parameter in inspect.signature(run).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
        raise InputError(f"{error}; and run's own arguments: {', '.join(own)} (--classes is classes_file)") from None


def summarise(manifest: dict, out: Path, outputs: dict[str, str] | None = None) -> RunResult:
    """A :class:`RunResult` from a manifest (also used by ``sanitize inspect``)."""
    return RunResult(out=out, method=manifest["method"], counts=manifest["counts"],
                     per_class=manifest["per_class"], suspect_target=suspect_target(manifest),
                     outputs=outputs or _listed_outputs(out), timings_s=manifest["timings_s"],
                     metrics=manifest.get("metrics", {}), manifest=manifest,
                     warnings=manifest.get("warnings", []), input_warnings=manifest["input"]["warnings"])


# A dirty-label backdoor gives its poisons one label, so that class is over-represented among the
# suspects. More than twice its share of the data counts as a pointer; below that the most common
# label of the suspects may be just the hardest class. (DBD flags half of any dataset, so no class
# can pass twice its share there: its pointer is never shown.) A handful of suspects can pass that
# by chance, so the excess must also be significant (``suspect_target``).
TARGET_LIFT = 2.0
TARGET_P = 1e-3


def suspect_target(manifest: dict) -> dict | None:
    """The class the suspects point to, {"class", "label", "share", "lift", "p_value", "relabeled_away"}, or None
    if none stands out.

    ``share``: the fraction of suspects that carry the label; ``lift``: that fraction
    over the label's fraction of all readable samples. A class stands out when its lift
    passes TARGET_LIFT and so many suspects would carry it by chance with probability
    ``p_value`` < TARGET_P divided by the number of classes (the most common label is
    picked from all of them): ten suspects, four of one class in ten, are a lift of 4
    and a p-value of 0.013, which chance explains. ``relabeled_away``: the share of the
    suspects carrying that label that the clean model gives another one. A dirty-label
    backdoor's poisons are images of other classes, so most of them are relabeled away;
    hard clean samples of the class (and clean-label poisons) mostly keep their label.
    """
    suspects = manifest["suspects"]
    if not suspects:
        return None
    classes = manifest["input"]["classes"]
    label, count = collections.Counter(s["label"] for s in suspects).most_common(1)[0]
    readable = sum(row["total"] for row in manifest["per_class"].values())
    expected = manifest["per_class"][classes[label]]["total"] / max(1, readable)
    if expected == 0:  # only a hand-edited manifest (read_manifest refuses most of those)
        return None
    share = count / len(suspects)
    lift = share / expected
    p_value = binomial_tail(count, len(suspects), expected)
    if lift <= TARGET_LIFT or p_value >= TARGET_P / len(classes):
        return None
    away = sum(s["relabel"] != label for s in suspects if s["label"] == label) / count
    return {"class": classes[label], "label": label, "share": round(share, 4), "lift": round(lift, 2),
            "p_value": float(f"{p_value:.3g}"), "relabeled_away": round(away, 4)}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (n may be tens of thousands)."""
    if k <= 0 or p >= 1:
        return 1.0
    if p <= 0:
        return 0.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def _listed_outputs(out: Path) -> dict[str, str]:
    found = {"manifest": "manifest.json", "scores": "scores.csv", "model": "model.onnx",
             "clean": "clean", "relabeled": "relabeled"}
    return {name: rel for name, rel in found.items() if (out / rel).exists()}


def _load_bank(ingested, device: torch.device) -> Bank:
    if len(ingested.samples) == 0:
        raise InputError(f"no readable images in {ingested.path} ({len(ingested.unreadable)} unreadable)")
    labels = ingested.labels
    if len(np.unique(labels)) < 2:
        raise InputError("the readable samples cover fewer than two classes; a classifier needs at least two")
    return _guard_memory(lambda: Bank.from_arrays(ingested.images, labels, ingested.classes, device))


def _guard_memory(work):
    """Turn running out of GPU or CPU memory into one actionable line."""
    try:
        return work()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise InputError("out of GPU memory; try a smaller --batch-size, a smaller --image-size "
                         "or --device cpu") from None
    except (MemoryError, RuntimeError) as error:
        # torch's CPU allocator raises a RuntimeError ("DefaultCPUAllocator: can't allocate memory")
        if isinstance(error, RuntimeError) and "can't allocate memory" not in str(error):
            raise
        raise InputError("out of memory on the CPU; try a smaller --batch-size or --image-size, or check the "
                         "options that size the model or the data") from None


def _check_result(result: MethodResult, n: int) -> None:
    """A method that breaks the seam is a bug in our code: fail loudly, never write bad outputs."""
    for name, dtype in (("score", np.floating), ("suspected", np.bool_), ("relabel", np.integer)):
        value = getattr(result, name)
        if value.shape != (n,) or not np.issubdtype(value.dtype, dtype):
            raise AssertionError(f"method returned {name} {value.dtype}{value.shape}, expected [{n}]")
    if not np.isfinite(result.score).all():  # a training that diverged without a NaN loss
        raise InputError(train.DIVERGED)


def _export(result: MethodResult, bank: Bank, path: Path, method: str) -> dict:
    export_onnx(result.model, path, classes=bank.classes, input_size=bank.image_size, mean=bank.mean,
                std=bank.std, method=method)
    picked = torch.linspace(0, bank.n - 1, min(bank.n, ONNX_CHECK_SAMPLES)).long().to(bank.device)
    return check_onnx(path, result.model, bank.images[picked])


def _timed(function, *args, **kwargs):
    """(``function(*args, **kwargs)``, its wall time in seconds)."""
    start = time.perf_counter()
    return function(*args, **kwargs), round(time.perf_counter() - start, 3)


def _stage_order(pipeline: dict[str, float], method: dict[str, float], wall_s: float) -> dict[str, float]:
    """ingest, the method's stages in order, write, export, and the total wall time (less than
    the stages' sum: writing and export overlap)."""
    ordered = {"ingest": pipeline["ingest"], **method, "write": pipeline["write"], "export": pipeline["export"]}
    ordered["total"] = round(wall_s, 3)
    return ordered


def _environment(device: torch.device) -> dict:
    """What a run's results depend on beyond its input and options. ``cpu_threads``: torch's thread count
    orders the CPU's float sums, and a small model's run can change with it (benchmarks/RESULTS.md, "DBD on
    SIG and on the clean set": AdvrBD found 85.8% of SIG's poisons on 2 threads, 97.8% on 1)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "device": f"{device.type}: {name}", "cpu_threads": torch.get_num_threads(), "sanitize": __version__}


def _jsonable(options: dict) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in options.items()}
