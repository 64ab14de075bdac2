"""Export the clean model to ONNX and prove the file computes what torch computes.

Contract (DESIGN.md): input ``input`` float32 [N, 3, H, W] RGB in [0, 1] with a
dynamic N, normalisation inside the graph, output ``logits`` float32 [N, K], and
metadata props ``classes``, ``input_size``, ``mean``, ``std``, ``method``,
``sanitize_version``.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from sanitize import __version__
from sanitize.formats.records import OnnxCheckError


def export_onnx(model: torch.nn.Module, path: Path, *, classes: list[str], input_size: tuple[int, int],
                mean, std, method: str) -> Path:
    """Write ``model`` (any device/dtype/layout) to ``path`` as a float32 CPU graph with metadata."""
    cpu_model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    example = torch.rand(2, 3, *input_size)
    # The exporter is chatty on stdout and warns about internals the user can't act on.
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(cpu_model, (example,), input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                                    verbose=False)
    graph = program.model_proto
    metadata = {"classes": json.dumps(list(classes)), "input_size": json.dumps(list(input_size)),
                "mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std]),
                "method": method, "sanitize_version": __version__}
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save_model(graph, str(path))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load_model(str(path), load_external_data=False).metadata_props}


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime for float32 [N, 3, H, W] images in [0, 1]."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": np.ascontiguousarray(images, dtype=np.float32)})[0]


def check_onnx(path: Path, model: torch.nn.Module, images: torch.Tensor, *, tolerance: float = 1e-3) -> dict:
    """Compare onnxruntime with the torch model (float32, CPU) on uint8 [N, 3, H, W] ``images``.

    Passes when every logit agrees within ``tolerance`` relative to the logits' scale
    and the argmax agrees wherever the top two logits are not a near tie. Raises
    :class:`OnnxCheckError` otherwise; returns the figures for the manifest.
    """
    inputs = images.detach().cpu().float().div(255)
    reference = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        expected = reference(inputs).numpy()
    got = onnx_logits(path, inputs.numpy())
    if got.shape != expected.shape:
        raise OnnxCheckError(f"ONNX output shape {got.shape} != torch {expected.shape}")
    scale = max(1.0, float(np.abs(expected).max()))
    max_diff = float(np.abs(got - expected).max())
    top2 = np.sort(expected, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance * scale
    disagree = int(((got.argmax(1) != expected.argmax(1)) & decisive).sum())
    if max_diff > tolerance * scale or disagree:
        raise OnnxCheckError(f"exported ONNX model disagrees with torch on {len(inputs)} real samples: "
                             f"max logit difference {max_diff:.3g} (allowed {tolerance * scale:.3g}), "
                             f"{disagree} different predictions")
    return {"samples": len(inputs), "max_logit_diff": max_diff, "argmax_agree": True}


class _quiet:
    """Raise the named loggers to ERROR for the duration of a block."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(name) for name in names]

    def __enter__(self):
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
