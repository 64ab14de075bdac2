"""The same contracts on CUDA (bf16 autocast, channels_last, the bank on the device). Skipped without a GPU."""
import numpy as np
import pytest
import torch

import sanitize
from sanitize import train
from sanitize.data import Bank, augment, make_generator
from sanitize.formats import read_manifest, read_scores
from sanitize.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FAST = {"arch": "small", "quick": True, "device": "cuda", "batch_size": 64}


@pytest.fixture(scope="module")
def cuda_bank(cifar_arrays, cifar_classes):
    return Bank.from_arrays(*cifar_arrays, cifar_classes, device="cuda")


def test_the_bank_lives_on_the_gpu_as_uint8_and_augments_there(cuda_bank):
    assert cuda_bank.images.is_cuda and cuda_bank.images.dtype == torch.uint8
    same = cuda_bank.images[:1].repeat(64, 1, 1, 1)
    views = augment(same, make_generator(0, cuda_bank.device))
    assert views.is_cuda and views.dtype == torch.float32
    assert len({tuple(v.flatten().tolist()) for v in views.cpu()}) > 8  # drawn per sample, not per batch


def test_colour_jitter_on_the_gpu_is_sync_free_and_the_same_as_picking_samples(cuda_bank):
    """On CUDA color_jitter takes the fused way by default; it must match the CPU's way on the same draws."""
    from sanitize.data import color_jitter, to_float

    images = to_float(cuda_bank.images[:128])
    fused = color_jitter(images, make_generator(0, cuda_bank.device))
    picked = color_jitter(images, make_generator(0, cuda_bank.device), sync_free=False)
    assert fused.is_cuda and torch.allclose(fused, picked, atol=1e-6) and not torch.equal(fused, images)


def test_bf16_channels_last_training_learns(cuda_bank):
    torch.manual_seed(0)
    model = build_model("small", 10, cuda_bank.image_size, cuda_bank.mean, cuda_bank.std)
    model = train.prepare(model, cuda_bank.device)
    assert next(model.parameters()).is_cuda
    before = train.accuracy(model, cuda_bank.images, cuda_bank.labels)
    train.train_supervised(model, cuda_bank, epochs=15, batch_size=64, lr=0.1)
    after = train.accuracy(model, cuda_bank.images, cuda_bank.labels)
    assert after > before + 20  # fits its own training images


@pytest.mark.parametrize("method, layout", [("advrbd", "shards"), ("dbd", "shards"), ("advrbd", "folder")])
def test_run_on_cuda_writes_the_contract_and_a_matching_onnx_model(method, layout, make_shards, make_imagefolder,
                                                                   tmp_path):
    # The ONNX check (float32 onnxruntime against the bf16-trained torch model) runs inside sanitize.run.
    data = make_shards(200) if layout == "shards" else make_imagefolder(200)
    result = sanitize.run(data, method=method, out=tmp_path / "out", **FAST)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["environment"]["device"].startswith("cuda")
    counts = result.counts
    assert counts["clean"] + counts["suspected"] + counts["unreadable"] == counts["total"] == 200
    assert all(np.isfinite(row["score"]) for row in read_scores(tmp_path / "out"))


def test_same_seed_same_scores_on_cuda(make_shards, tmp_path):
    data = make_shards(200)
    for name in ("first", "second"):
        sanitize.run(data, out=tmp_path / name, **FAST)
    assert (tmp_path / "first" / "scores.csv").read_bytes() == (tmp_path / "second" / "scores.csv").read_bytes()
