"""The seam between methods and outputs.

A method takes the decoded :class:`sanitize.data.Bank` and its options and returns
a :class:`MethodResult`. It never opens a file.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MethodResult:
    """Per-sample verdicts, aligned with the bank's rows.

    score:     float64 [N], higher = more likely poisoned, comparable within one run.
    suspected: bool [N].
    relabel:   int64 [N], the label the clean model gives each sample.
    model:     the clean model (eval mode), input float [N,3,H,W] in [0,1].
    """

    score: np.ndarray
    suspected: np.ndarray
    relabel: np.ndarray
    model: torch.nn.Module
    timings_s: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # JSON-serialisable, goes into the manifest
    details: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample diagnostics, [N] each
    warnings: list[str] = field(default_factory=list)  # what the user must know about the verdicts


class StageClock:
    """Times named stages (synchronising CUDA so the figures are real) and reports them to ``progress``.

    ``progress`` is any object with ``stage(name)`` and, optionally, ``advance(done, total)``
    (steps or rounds within the current stage); ``None`` is silent.
    """

    def __init__(self, device: torch.device, progress=None):
        self.sync = device.type == "cuda"
        self.progress = progress
        self.timings_s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.progress is not None:
            self.progress.stage(name)
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.timings_s[name] = round(self.timings_s.get(name, 0.0) + time.perf_counter() - start, 3)

    def advance(self, done: int, total: int) -> None:
        """Report progress within the current stage; the signature of ``train.Progress``."""
        report = getattr(self.progress, "advance", None)
        if report is not None:
            report(done, total)
