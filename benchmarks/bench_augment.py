"""SimCLR's per-sample colour jitter, both ways (``data.color_jitter``): picking each slot's samples, or
sync-free over the whole batch. Which is the default depends on the device (picking on a CPU, sync-free on
a GPU); this says whether that choice is right there.

Prints one JSON object: per (side, batch), the median milliseconds of ``--repeat`` calls each way, on
random float images already on the device, the device synchronised around each call.

    python benchmarks/bench_augment.py --device cuda          # gpu_session.sh tests runs it
    python benchmarks/bench_augment.py --device cpu --sizes 32x512,224x64
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sanitize.data import color_jitter, make_generator
from sanitize.train import resolve_device


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="32x1024,224x256", help="comma-separated SIDExBATCH")
    parser.add_argument("--repeat", type=int, default=20)
    return parser.parse_args()


def time_call(call, device: torch.device, repeat: int) -> float:
    """Median milliseconds of ``call()`` after one warm-up call."""
    call()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "ms": {}}
    for size in args.sizes.split(","):
        side, batch = (int(part) for part in size.split("x"))
        images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
        generator = make_generator(0, device)
        report["ms"][size] = {way: time_call(lambda: color_jitter(images, generator, sync_free=way == "sync_free"),
                                             device, args.repeat)
                              for way in ("picked", "sync_free")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
