"""Everything that touches bytes on disk: readers, writers, the manifest.

Reading: ``read_dataset`` (ImageFolder or WebDataset) -> ``Ingested``.
Writing: ``staged_output`` (atomic OUT), ``write_outputs`` (clean and relabeled
sets, scores.csv), ``write_dataset`` (a dataset copy), ``build_manifest`` /
``write_manifest``. Reading results back: ``read_manifest``, ``read_scores``.
Nothing here imports torch at import time (decoding workers import this package).
"""
from sanitize.formats.manifest import (build_manifest, read_manifest, read_scores, validate_manifest,
                                       write_manifest)
from sanitize.formats.readers import read_dataset
from sanitize.formats.records import Ingested, InputError, Sample, Unreadable
from sanitize.formats.writers import staged_output, write_dataset, write_outputs

__all__ = [
    "Ingested", "InputError", "Sample", "Unreadable",
    "read_dataset", "staged_output", "write_outputs", "write_dataset",
    "build_manifest", "validate_manifest", "write_manifest", "read_manifest", "read_scores",
]
