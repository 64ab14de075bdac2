"""Work that runs inline, or over one process pool shared by reading and decoding."""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from sanitize.formats.records import InputError


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2).

    ``os.cpu_count()`` counts the host's CPUs, so in a container limited to 2 CPUs on a
    64-CPU host it would start 64 workers that fight over 2.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, count)


class Workers:
    """``map`` inline or over a pool of ``count`` processes (default ``available_cpus()``), started on first need.

    Use as a context manager so the pool is shut down. The pool uses spawn, not
    fork: the caller may already hold CUDA or torch threads, which fork can
    deadlock. Spawned workers normally re-run the caller's script first, so a
    script without an ``if __name__ == "__main__":`` guard would start a second
    ``sanitize.run`` in every worker; ours only ever run sanitize's own functions,
    so they are started without the caller's ``__main__`` (see ``_without_main``).
    """

    def __init__(self, count: int | None = None):
        self.count = count or available_cpus()
        self._pool: ProcessPoolExecutor | None = None

    def map(self, function, *iterables, parallel: bool = True) -> Iterator:
        """Results in input order; ``parallel=False`` (or one worker) runs inline."""
        if not parallel or self.count <= 1:
            return map(function, *iterables)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"))
        with _without_main():  # Executor.map submits every task, and so starts every worker, right here
            results = self._pool.map(function, *iterables)
        return _reported(results, self.count)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _reported(results: Iterator, count: int) -> Iterator:
    """A worker killed from outside Python (out of memory, a decoder crash) is the user's to fix, in one line."""
    try:
        yield from results
    except BrokenProcessPool:
        raise InputError(f"a worker process reading or writing the data died (out of memory, or a file that "
                         f"crashes the image decoder?); {count} workers were running: try --workers 1 or fewer"
                         ) from None


@contextlib.contextmanager
def _without_main():
    """Hide the caller's ``__main__`` while workers start: spawn passes its path (or module name) to
    each new process, which runs it before taking work. An empty stand-in has neither."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main
