"""`sanitize demo`: a real, small, end-to-end example that runs on a CPU in a few minutes.

The project ships 2,000 CIFAR-10 training and 500 test images (JPEG, as in the
original shards). The demo poisons the training images itself with a BadNets
patch (5%, target class 0), sanitizes the poisoned copy with AdvrBD
(``--arch small --quick``), and scores the outcome against the poisoning's
ground truth: detection recall/precision, and the exported ONNX model's clean
accuracy and attack success rate on the test images.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from sanitize.formats.records import InputError

ATTACK, RATE, TARGET = "badnets", 0.05, 0
MARKER = ".sanitize-demo"


def shipped(name: str) -> Path:
    return Path(str(resources.files(__name__) / name))


def run_demo(out: Path, *, device: str = "cpu", echo=print, progress=None) -> dict:
    """Poison, sanitize and score; returns the figures it printed. ``progress`` as in :func:`sanitize.run`."""
    from sanitize import pipeline
    from sanitize.attacks import make_attack, poison_dataset

    _claim(out)
    echo(f"1/3 poisoning {shipped('cifar10-train-2000.tar.gz').name} with {ATTACK} "
         f"({RATE:.0%}, target class {TARGET}) -> {out / 'poisoned'}")
    truth = poison_dataset(shipped("cifar10-train-2000.tar.gz"), attack=ATTACK, rate=RATE, target=TARGET,
                           out=out / "poisoned", seed=0, overwrite=True)
    echo(f"2/3 sanitizing with advrbd (--arch small --quick, {device}) -> {out / 'sanitized'}")
    result = pipeline.run(out / "poisoned", method="advrbd", out=out / "sanitized", device=device,
                          arch="small", quick=True, overwrite=True, progress=progress)
    echo("3/3 scoring against the ground truth (truth.json) and the shipped test images")
    figures = {**_detection(result.manifest, truth), **_model_figures(out / "sanitized" / "model.onnx",
                                                                        make_attack(ATTACK, **truth["params"]))}
    echo(f"  poisons found: recall {figures['recall']:.1f}%, precision {figures['precision']:.1f}% "
         f"({figures['found']} of {figures['poisoned']} poisons among {figures['suspected']} suspects)")
    echo(f"  clean model (model.onnx): accuracy {figures['acc']:.1f}%, attack success rate {figures['asr']:.1f}% "
         f"(a small CNN trained for seconds; the GPU benchmark uses ResNet-18)")
    echo(f"  outputs: {out / 'sanitized'} (manifest.json, scores.csv, clean/, relabeled/, model.onnx); "
         f"audit with: sanitize inspect {out / 'sanitized'}")
    return figures


def _claim(out: Path) -> None:
    """Only ever write into an empty directory or one a previous demo made."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise InputError(f"{out} exists and was not made by the demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def _detection(manifest: dict, truth: dict) -> dict:
    poisoned = set(truth["poisoned"])
    suspected = {s["key"] for s in manifest["suspects"]}
    found = len(poisoned & suspected)
    return {"poisoned": len(poisoned), "suspected": len(suspected), "found": found,
            "recall": 100 * found / max(1, len(poisoned)), "precision": 100 * found / max(1, len(suspected))}


def _model_figures(model_path: Path, attack) -> dict:
    """Clean accuracy and attack success rate of the exported model on the shipped test images."""
    from sanitize.formats import read_dataset
    from sanitize.formats.onnx import onnx_logits

    test = read_dataset(shipped("cifar10-test-500.tar.gz"))
    labels = test.labels

    def predict(images: np.ndarray) -> np.ndarray:
        return onnx_logits(model_path, images.transpose(0, 3, 1, 2).astype(np.float32) / 255).argmax(1)

    acc = float((predict(test.images) == labels).mean() * 100)
    counted = attack.asr_mask(labels, TARGET)
    triggered = attack.trigger(test.images[counted], seed=0)
    asr = float((predict(triggered) == TARGET).mean() * 100)
    return {"acc": acc, "asr": asr}
