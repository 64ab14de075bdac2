import json

import numpy as np
import onnx
import pytest
import torch

from sanitize.formats.onnx import OnnxCheckError, check_onnx, export_onnx, onnx_logits, read_metadata
from sanitize.models import build_model

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cifar_arrays):
    torch.manual_seed(0)
    model = build_model("small", 10, 32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26)).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", classes=CLASSES,
                       input_size=(32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), method="advrbd")
    images = torch.from_numpy(cifar_arrays[0][:64]).permute(0, 3, 1, 2).contiguous()
    return model, path, images


def test_contract_names_shapes_and_metadata(exported):
    _, path, _ = exported
    graph = onnx.load_model(str(path))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]  # dynamic batch
    meta = read_metadata(path)
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["input_size"]) == [32, 32]
    assert json.loads(meta["mean"]) == pytest.approx([0.49, 0.48, 0.45]) and meta["method"] == "advrbd"
    assert meta["sanitize_version"]


def test_onnxruntime_matches_torch_on_real_samples_with_any_batch(exported):
    model, path, images = exported
    report = check_onnx(path, model, images)
    assert report["samples"] == 64 and report["max_logit_diff"] < 1e-3
    for batch in (1, 7):  # normalisation is inside: raw [0, 1] pixels go in
        got = onnx_logits(path, images[:batch].float().numpy() / 255)
        assert got.shape == (batch, 10)


def test_a_tampered_model_fails_the_check(exported, tmp_path):
    model, path, images = exported
    graph = onnx.load_model(str(path))
    weight = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[: values.size // 4] *= -3
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save_model(graph, str(tampered))
    with pytest.raises(OnnxCheckError, match="disagrees with torch"):
        check_onnx(tampered, model, images)


def test_export_leaves_the_trained_model_untouched(exported):
    model, _, images = exported
    assert next(model.parameters()).device.type == "cpu" and not model.training
