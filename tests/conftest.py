"""Shared fixtures: real samples cut from ../shared/data/cifar10, laid out as the tests need."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
CIFAR = Path(os.environ.get("SANITIZE_CIFAR", REPO.parent / "shared" / "data" / "cifar10"))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package; some import ``bench``)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _read_cifar(n: int, shard: str) -> list[tuple[str, bytes, int]]:
    """The first ``n`` samples of a CIFAR-10 shard as (key, jpeg bytes, label)."""
    found: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(CIFAR / shard, "r:gz") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in found:
                if len(order) == n:
                    break
                found[key] = {}
                order.append(key)
            found[key][ext] = tar.extractfile(member).read()
    return [(k, found[k]["jpg"], int(found[k]["cls"])) for k in order if {"jpg", "cls"} <= found[k].keys()]


@pytest.fixture(scope="session")
def cifar_classes() -> list[str]:
    return json.loads((CIFAR / "classes.json").read_text())["classes"]


@pytest.fixture(scope="session")
def cifar_samples() -> list[tuple[str, bytes, int]]:
    """600 real CIFAR-10 training samples: (key, jpeg bytes, label)."""
    return _read_cifar(600, "train-000000.tar.gz")


@pytest.fixture(scope="session")
def cifar_test_samples() -> list[tuple[str, bytes, int]]:
    """300 real CIFAR-10 test samples: (key, jpeg bytes, label)."""
    return _read_cifar(300, "test-000000.tar.gz")


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a plain tar with the given (name, bytes) members in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(root: Path, samples, classes: list[str], per_shard: int = 100) -> Path:
    """``samples`` (key, jpeg bytes, label) as ``root/part-%06d.tar`` shards plus classes.json."""
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), per_shard):
        members = []
        for key, jpg, label in samples[start:start + per_shard]:
            members += [(f"{key}.jpg", jpg), (f"{key}.cls", str(label).encode())]
        write_shard(root / f"part-{start // per_shard:06d}.tar", members)
    (root / "classes.json").write_text(json.dumps({"classes": classes}))
    return root


@pytest.fixture
def make_shards(tmp_path, cifar_samples, cifar_classes):
    """Factory: ``make_shards(n, per_shard)`` -> directory of CIFAR shards plus classes.json."""

    def make(n: int = 200, per_shard: int = 100, root: Path | None = None) -> Path:
        return write_shards(root or tmp_path / "shards", cifar_samples[:n], cifar_classes, per_shard)

    return make


@pytest.fixture
def make_imagefolder(tmp_path, cifar_samples, cifar_classes):
    """Factory: ``make_imagefolder(n)`` -> ImageFolder tree root/<class>/<key>.jpg of real CIFAR images."""

    def make(n: int = 200, root: Path | None = None) -> Path:
        root = root or tmp_path / "folder"
        for key, jpg, label in cifar_samples[:n]:
            target = root / cifar_classes[label] / f"{key}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jpg)
        return root

    return make


def decode_jpegs(samples: list[tuple[str, bytes, int]]):
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) decoded with Pillow, for tests below the formats layer."""
    import numpy as np
    from PIL import Image

    images = np.stack([np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")) for _, jpg, _ in samples])
    labels = np.array([label for _, _, label in samples], dtype=np.int64)
    return images, labels


@pytest.fixture(scope="session")
def cifar_arrays(cifar_samples):
    return decode_jpegs(cifar_samples)
