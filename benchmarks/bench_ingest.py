"""Ingest throughput: ``read_dataset`` on the CIFAR-10 training shards (50,000 samples) per worker count.

Prints one JSON object: the machine's CPU count and, per worker count, the
wall time of the best of ``--repeat`` runs and samples per second. Reading
includes listing the shards (gzip + tar), hashing every sample and decoding
it to the working size.

    python benchmarks/bench_ingest.py --data ../shared/data/cifar10 --workers 1,2,4,8
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from sanitize.formats import read_dataset


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train-000000..000004.tar.gz")
    parser.add_argument("--shards", default="train-{000000..000004}.tar.gz",
                        help="shard name or brace pattern inside --data (fewer shards = a cheaper run)")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per worker count; the fastest is reported (the first also warms the file cache)")
    return parser.parse_args()


def time_read(path: str, workers: int) -> tuple[float, int]:
    """(seconds, readable samples) of one ``read_dataset``."""
    start = time.perf_counter()
    ingested = read_dataset(path, workers=workers)
    return time.perf_counter() - start, len(ingested.samples)


def main() -> None:
    args = parse_args()
    path = f"{args.data}/{args.shards}"
    runs = []
    for workers in (int(count) for count in args.workers.split(",")):
        seconds, samples = min(time_read(path, workers) for _ in range(args.repeat))
        runs.append({"workers": workers, "samples": samples, "seconds": round(seconds, 3),
                     "samples_per_s": round(samples / seconds, 1)})
    print(json.dumps({"data": path, "cpu_count": os.cpu_count(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
