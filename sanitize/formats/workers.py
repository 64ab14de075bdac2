"""Work that runs inline, or over one process pool shared by reading and decoding."""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor


class Workers:
    """``map`` inline or over a pool of ``count`` processes (default ``os.cpu_count()``), started on first need.

    Use as a context manager so the pool is shut down. The pool uses spawn, not
    fork: the caller may already hold CUDA or torch threads, which fork can
    deadlock. Like any spawn pool, a calling *script* needs the
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, count: int | None = None):
        self.count = count or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    def map(self, function, *iterables, parallel: bool = True) -> Iterator:
        """Results in input order; ``parallel=False`` (or one worker) runs inline."""
        if not parallel or self.count <= 1:
            return map(function, *iterables)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.map(function, *iterables)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
