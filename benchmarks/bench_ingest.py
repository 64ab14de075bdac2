"""Ingest throughput: ``read_dataset`` on the CIFAR-10 training shards (50,000 samples) per worker count.

Prints one JSON object: the machine's CPU count and, per worker count, the
wall time of the best of ``--repeat`` runs and samples per second. Reading
includes listing the shards (gzip + tar), hashing every sample and decoding
it to the working size. Each run also says where its time went: ``phases_s``,
the wall time of listing (which starts the worker pool) and of decoding, and
``parent_cpu_s``, the CPU time of this process (what the workers cannot share:
with enough cores, the floor). ``pool_start_s`` is the time to start that many
workers and have each run one empty task.

    python benchmarks/bench_ingest.py --data ../shared/data/cifar10 --workers 1,2,4,8
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sanitize.formats import read_dataset, readers
from sanitize.formats.workers import Workers


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train-000000..000004.tar.gz")
    parser.add_argument("--shards", default="train-{000000..000004}.tar.gz",
                        help="shard name or brace pattern inside --data (fewer shards = a cheaper run)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per worker count; the fastest is reported (the first also warms the file cache)")
    return parser.parse_args()


def time_read(path: str, workers: int) -> tuple[float, int, dict, float]:
    """(seconds, readable samples, wall seconds per phase, this process's CPU seconds) of one ``read_dataset``."""
    phases = {}
    timed = {"list": "_list", "decode": "decode_images"}
    originals = {name: getattr(readers, name) for name in timed.values()}

    def clocked(phase, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[phase] = round(time.perf_counter() - start, 3)
        return run

    for phase, name in timed.items():
        setattr(readers, name, clocked(phase, originals[name]))
    cpu, start = time.process_time(), time.perf_counter()
    try:
        ingested = read_dataset(path, workers=workers)
    finally:
        for name, function in originals.items():
            setattr(readers, name, function)
    return time.perf_counter() - start, len(ingested.samples), phases, time.process_time() - cpu


def pool_start(workers: int) -> float:
    """Seconds to start ``workers`` processes and run an empty task on each (0 where reading runs inline)."""
    start = time.perf_counter()
    with Workers(workers) as pool:
        list(pool.map(abs, range(workers)))
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    path = f"{args.data}/{args.shards}"
    runs = []
    for workers in (int(count) for count in args.workers.split(",")):
        seconds, samples, phases, parent_cpu = min((time_read(path, workers) for _ in range(args.repeat)),
                                                      key=lambda run: run[0])
        runs.append({"workers": workers, "samples": samples, "seconds": round(seconds, 3),
                     "samples_per_s": round(samples / seconds, 1), "phases_s": phases,
                     "parent_cpu_s": round(parent_cpu, 3), "pool_start_s": round(pool_start(workers), 3)})
    print(json.dumps({"data": path, "cpu_count": os.cpu_count(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
