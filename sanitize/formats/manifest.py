"""manifest.json (schema_version 1, see DESIGN.md) and scores.csv: build, validate, write, read.

The schema ships as ``manifest.schema.json`` beside this module; the
invariants a JSON Schema cannot state (counts add up, suspects sorted by
descending score) are checked here too.
"""
from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from sanitize import __version__
from sanitize.formats.records import Ingested, InputError
from sanitize.formats.writers import SCORES_HEADER, check_verdicts

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCORES = "scores.csv"


def build_manifest(ingested: Ingested, *, method: str, options: dict, seed: int, score, suspected, relabel,
                   model: dict, timings_s: dict, environment: dict, metrics: dict | None = None,
                   warnings: list[str] | None = None) -> dict:
    """The audit manifest of one run; score/suspected/relabel are aligned with ``ingested.samples``.
    ``warnings``: what the method says about its verdicts (the input's own are under ``input``)."""
    score, suspected, relabel = check_verdicts(ingested, score, suspected, relabel)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "sanitize", "version": __version__},
        "method": method, "options": options, "seed": seed,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "input": _input(ingested),
        "counts": {"total": ingested.total, "clean": int((~suspected).sum()), "suspected": int(suspected.sum()),
                   "unreadable": len(ingested.unreadable)},
        "per_class": _per_class(ingested, suspected),
        "suspects": _suspects(ingested, score, suspected, relabel),
        "unreadable": [item.to_json() for item in ingested.unreadable],
        "model": model, "timings_s": timings_s, "environment": environment, "metrics": metrics or {},
        "warnings": list(warnings or []),
    }
    return json.loads(json.dumps(manifest, default=_plain, allow_nan=False))


def _plain(value):
    """numpy scalars and arrays, paths and tuples as JSON; anything else is a bug in the caller."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable in the manifest: {type(value).__name__}")


def _input(ingested: Ingested) -> dict:
    return {"path": ingested.path, "format": ingested.format, "classes": ingested.classes,
            "fingerprint": ingested.fingerprint, "image_size": list(ingested.image_size),
            "size_rule": ingested.size_rule, "skipped": ingested.skipped, "warnings": ingested.warnings}


def _per_class(ingested: Ingested, suspected: np.ndarray) -> dict:
    labels = ingested.labels
    num_classes = len(ingested.classes)
    totals = np.bincount(labels, minlength=num_classes)
    flagged = np.bincount(labels[suspected], minlength=num_classes)
    return {name: {"total": int(totals[index]), "suspected": int(flagged[index])}
            for index, name in enumerate(ingested.classes)}


def _suspects(ingested: Ingested, score, suspected, relabel) -> list[dict]:
    """Suspected samples by descending score; ties keep input order, so the list is reproducible."""
    indices = np.flatnonzero(suspected)
    indices = indices[np.argsort(-score[indices], kind="stable")]
    return [{"key": ingested.samples[i].key, "source": ingested.samples[i].source,
             "sha256": ingested.samples[i].sha256, "label": ingested.samples[i].label,
             "relabel": int(relabel[i]), "score": float(score[i])} for i in indices]


@cache
def schema() -> dict:
    return json.loads(resources.files("sanitize.formats").joinpath("manifest.schema.json").read_text("utf-8"))


def validate_manifest(manifest: dict) -> None:
    """Raise ValueError naming the path of the first problem (schema, then the invariants)."""
    import jsonschema  # ~0.1 s to import; only runs that write or check a manifest pay it

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ValueError(f"manifest {where}: {error.message}")
    _check_invariants(manifest)


def _check_invariants(manifest: dict) -> None:
    counts = manifest["counts"]
    problems = [
        ("counts", counts["clean"] + counts["suspected"] + counts["unreadable"] != counts["total"],
         "clean + suspected + unreadable != total"),
        ("suspects", len(manifest["suspects"]) != counts["suspected"], "length differs from counts/suspected"),
        ("unreadable", len(manifest["unreadable"]) != counts["unreadable"], "length differs from counts/unreadable"),
        ("suspects", any(a["score"] < b["score"] for a, b in zip(manifest["suspects"], manifest["suspects"][1:])),
         "not sorted by descending score"),
        ("per_class", set(manifest["per_class"]) != set(manifest["input"]["classes"]),
         "classes differ from input/classes"),
        ("per_class", sum(row["total"] for row in manifest["per_class"].values())
         != counts["clean"] + counts["suspected"], "totals do not add up to the readable samples"),
        ("per_class", sum(row["suspected"] for row in manifest["per_class"].values()) != counts["suspected"],
         "suspected do not add up to counts/suspected"),
        ("per_class", any(row["suspected"] > row["total"] for row in manifest["per_class"].values()),
         "a class with more suspects than samples"),
        ("suspects", any(type(s[name]) is not int for s in manifest["suspects"] for name in ("label", "relabel")),
         "a label or relabel that is not a whole number"),  # the schema's "integer" takes 1.0
        ("suspects", any(not 0 <= s[name] < len(manifest["input"]["classes"]) for s in manifest["suspects"]
                         for name in ("label", "relabel")), "a label or relabel outside input/classes"),
        ("suspects", len({s["key"] for s in manifest["suspects"]}) != len(manifest["suspects"]), "a key listed twice"),
    ]
    for where, broken, message in problems:
        if broken:
            raise ValueError(f"manifest {where}: {message}")


def write_manifest(directory, manifest: dict) -> Path:
    """Validate and write ``directory/manifest.json``; returns its path."""
    validate_manifest(manifest)
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_manifest(out_dir) -> dict:
    """``out_dir/manifest.json``, validated. A missing or broken manifest is the user's error (InputError)."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
        validate_manifest(manifest)
    except FileNotFoundError:
        raise InputError(f"no {MANIFEST} in {out_dir}: not a sanitize output directory") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InputError(f"{path} is not a valid sanitize manifest: {error}") from None
    except RecursionError:  # JSON nested deeper than Python's stack
        raise InputError(f"{path} is not a valid sanitize manifest: nested too deeply") from None
    except OSError as error:  # a directory, no permission, ...
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    return manifest


def _not_json(name: str):
    """NaN and Infinity: Python's json reads them, strict JSON (and our writer) has none."""
    raise ValueError(f"{name} is not a JSON number")


def read_scores(out_dir) -> list[dict]:
    """``out_dir/scores.csv`` as dicts with typed values (label/relabel int, score float, suspected bool)."""
    with open(Path(out_dir) / SCORES, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if tuple(reader.fieldnames or ()) != SCORES_HEADER:
            raise ValueError(f"{SCORES}: header {reader.fieldnames} is not {list(SCORES_HEADER)}")
        return [_typed(row) for row in reader]


def _typed(row: dict) -> dict:
    if row["suspected"] not in ("true", "false"):
        raise ValueError(f"{SCORES}: suspected must be true or false, got {row['suspected']!r}")
    return {"key": row["key"], "source": row["source"], "label": int(row["label"]), "score": float(row["score"]),
            "suspected": row["suspected"] == "true", "relabel": int(row["relabel"])}
