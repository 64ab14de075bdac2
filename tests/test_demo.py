"""The demo's own pieces (the whole demo is `make demo`, ~2 minutes on 2 cores: too slow for the suite)."""
import numpy as np
import pytest

from sanitize import demo
from sanitize.attacks import make_attack
from sanitize.formats import read_dataset
from sanitize.formats.records import InputError


def test_the_shipped_sample_is_there_and_readable():
    train = read_dataset(demo.shipped("cifar10-train-2000.tar.gz"))
    test = read_dataset(demo.shipped("cifar10-test-500.tar.gz"))
    assert (len(train.samples), len(test.samples)) == (2000, 500) and not train.unreadable and not test.unreadable
    assert len(train.classes) == 10 and len(np.unique(train.labels)) == 10


def test_demo_writes_only_into_its_own_or_an_empty_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not made by the demo"):
        demo._claim(tmp_path / "mine")
    demo._claim(tmp_path / "new")
    demo._claim(tmp_path / "new")  # a second demo run may reuse it
    assert (tmp_path / "new" / demo.MARKER).exists()


def test_an_unusable_out_or_a_missing_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import torch

    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="cannot write the demo's output .*afile"):
        demo.run_demo(tmp_path / "afile" / "sub")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="cuda"):
        demo.run_demo(tmp_path / "gpu", device="cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_detection_and_model_figures():
    truth = {"poisoned": ["a", "b", "c", "d"]}
    manifest = {"suspects": [{"key": key} for key in ("a", "b", "x")]}
    assert demo._detection(manifest, truth) == {"poisoned": 4, "suspected": 3, "found": 2, "recall": 50.0,
                                                "precision": 200 / 3}
    test = read_dataset(demo.shipped("cifar10-test-500.tar.gz"))
    attack = make_attack("badnets", **demo.ATTACK_PARAMS)
    always_target = demo._model_figures(lambda images: np.full(len(images), demo.TARGET), test, attack)
    assert always_target["asr"] == 100.0
    assert always_target["acc"] == pytest.approx(100 * (test.labels == demo.TARGET).mean())
    truthful = demo._model_figures(lambda images: np.full(len(images), -1), test, attack)
    assert truthful == {"acc": 0.0, "asr": 0.0}
