import pytest
import torch

from sanitize import train
from sanitize.data import Bank
from sanitize.formats.records import InputError
from sanitize.models import build_model


@pytest.fixture(scope="module")
def bank(cifar_arrays, cifar_classes):
    return Bank.from_arrays(*cifar_arrays, cifar_classes)


def test_supervised_training_fits_real_images(bank):
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    before = train.accuracy(model, bank.images, bank.labels)
    result = train.train_supervised(model, bank, epochs=8, batch_size=64, lr=0.05, seed=0)
    after = train.accuracy(model, bank.images, bank.labels)
    assert result["steps"] == 8 * (bank.n // 64)
    assert after > max(before, 10) + 15, (before, after)


def test_training_is_deterministic_for_a_seed(bank):
    def trained():
        torch.manual_seed(0)
        model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
        train.train_supervised(model, bank, indices=torch.arange(128), epochs=1, batch_size=32, seed=5)
        return train.predict_logits(model, bank.images[:16])

    assert torch.equal(trained(), trained())


def test_unlearning_loss_is_bounded_and_zero_when_unlearned():
    labels = torch.tensor([0, 1])
    confident = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    unlearned = torch.tensor([[-50.0, 0.0], [0.0, -50.0]])
    assert torch.isfinite(train.unlearning_loss(confident, labels))
    assert train.unlearning_loss(unlearned, labels) < 1e-6


def test_unlearn_relearn_drives_the_unlearn_set_away_from_its_labels(bank):
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    train.train_supervised(model, bank, epochs=4, batch_size=64, lr=0.05)
    forget, keep = torch.arange(0, 60), torch.arange(60, bank.n)
    fit_before = train.accuracy(model, bank.images[forget], bank.labels[forget])
    train.unlearn_relearn(model, bank, unlearn=forget, relearn=keep, epochs=2, batch_size=64, lr=0.02)
    assert train.accuracy(model, bank.images[forget], bank.labels[forget]) < fit_before / 2


def test_schedule_warms_up_then_decays_to_zero():
    factor = train.warmup_linear(100)
    assert factor(0) < factor(14) <= 1 and factor(99) < 0.02


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto").type == "cpu"


def test_predictor_takes_numpy_images_as_they_are_stored(cifar_arrays):
    images, _ = cifar_arrays
    torch.manual_seed(0)
    model = build_model("small", 10, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    predicted = train.predictor(model, torch.device("cpu"))(images[:40])
    expected = train.predict_logits(model, torch.from_numpy(images[:40]).permute(0, 3, 1, 2).contiguous()).argmax(1)
    assert predicted.shape == (40,) and (predicted == expected.numpy()).all()
