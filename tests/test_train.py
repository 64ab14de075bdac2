import copy

import numpy as np
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


@pytest.fixture(scope="module")
def fitted(bank):
    """The small CNN after 4 epochs on the bank (copy it before training it further)."""
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    train.train_supervised(model, bank, epochs=4, batch_size=64, lr=0.05)
    return model


def test_unlearn_relearn_drives_the_unlearn_set_away_from_its_labels(bank, fitted):
    model = copy.deepcopy(fitted)
    forget, keep = torch.arange(0, 60), torch.arange(60, bank.n)
    fit_before = train.accuracy(model, bank.images[forget], bank.labels[forget])
    train.unlearn_relearn(model, bank, unlearn=forget, relearn=keep, epochs=2, batch_size=64, lr=0.02)
    assert train.accuracy(model, bank.images[forget], bank.labels[forget]) < fit_before / 2


def test_supervised_training_unlearns_a_forget_set_beside_the_batches_it_learns(bank, fitted):
    forget, keep = torch.arange(0, 30), torch.arange(30, bank.n)
    fit_before = train.accuracy(fitted, bank.images[forget], bank.labels[forget])
    plain, unlearned = copy.deepcopy(fitted), copy.deepcopy(fitted)
    train.train_supervised(plain, bank, indices=keep, epochs=2, batch_size=64, lr=0.02)
    train.train_supervised(unlearned, bank, indices=keep, epochs=2, batch_size=64, lr=0.02, forget=forget)
    assert train.accuracy(unlearned, bank.images[forget], bank.labels[forget]) < fit_before / 2
    assert train.accuracy(plain, bank.images[forget], bank.labels[forget]) > fit_before / 2
    # the rest is still learned
    assert train.accuracy(unlearned, bank.images[keep], bank.labels[keep]) > 0.5


def test_an_empty_forget_set_trains_exactly_as_none(bank):
    models = [build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    train.train_supervised(models[0], bank, epochs=1, batch_size=64, lr=0.05)
    train.train_supervised(models[1], bank, epochs=1, batch_size=64, lr=0.05, forget=torch.empty(0, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_an_unlearn_batch_is_the_set_s_share_but_at_least_the_share_asked_for():
    assert train.unlearn_batch_size(128, 10, 990, 0.125) == 16
    assert train.unlearn_batch_size(128, 500, 500, 0.125) == 64
    assert train.unlearn_batch_size(128, 1, 10_000, 0.0) == 1


def test_schedule_warms_up_then_decays_to_zero():
    factor = train.warmup_linear(100)
    assert factor(0) < factor(14) <= 1 and factor(99) < 0.02


@pytest.mark.parametrize("count, batch_size", [(300, 128), (256, 128), (100, 128), (150, 64)])
def test_the_schedule_and_progress_end_with_the_last_batch_taken(bank, count, batch_size):
    """The remainder a full-size set drops must not be counted: the rate would stop short of zero."""
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    seen, rates = [], []
    step = torch.optim.SGD.step

    def record(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", record)
        result = train.train_supervised(model, bank, indices=torch.arange(count), epochs=2, batch_size=batch_size,
                                        lr=0.1, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (result["steps"], result["steps"]) == (len(rates), len(rates))
    factor = train.warmup_linear(len(rates))  # the schedule of exactly the steps taken, ending at its last
    assert rates == pytest.approx([0.1 * factor(i) for i in range(len(rates))])
    seen.clear()
    train.unlearn_relearn(model, bank, unlearn=torch.arange(count, count + 20), relearn=torch.arange(count),
                          batch_size=batch_size, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("count", [1, 2, 5, 7, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("drop_last, min_size", [(False, 1), (True, 1), (False, 2)])
def test_batches_and_batch_count_agree(count, drop_last, min_size):
    got = list(train.batches(torch.arange(count), 8, torch.Generator().manual_seed(0), drop_last, min_size))
    assert len(got) == train.batch_count(count, 8, drop_last, min_size)
    if min_size == 1 and not drop_last:  # scoring: every sample, once
        assert sorted(torch.cat(got).tolist()) == list(range(count))
    if len(got) > 1:  # a short last batch only when allowed
        assert len(got[-1]) >= (8 if drop_last else min_size)


def test_training_never_takes_a_batch_of_one_sample(cifar_arrays, cifar_classes):
    """8x8 images pool to 1x1 before the small CNN's last BatchNorm: 129 samples in batches of 128 used to
    leave one sample alone in a batch and crash training."""
    images, labels = cifar_arrays
    tiny = Bank.from_arrays(images[:129, ::4, ::4].copy(), labels[:129], cifar_classes)
    model = build_model("small", tiny.num_classes, tiny.image_size, tiny.mean, tiny.std)
    assert train.train_supervised(model, tiny, epochs=1, batch_size=128)["steps"] == 1
    assert train.train_supervised(model, tiny, indices=torch.arange(1), epochs=1)["steps"] == 0
    assert train.unlearn_relearn(model, tiny, unlearn=torch.arange(129), relearn=torch.arange(0))["steps"] == 0
    # a batch far beyond the set is the set (100,000 on 80 images drew 50,000 unlearn samples: 24 GB)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    assert train.unlearn_relearn(model, tiny, unlearn=torch.arange(20), relearn=torch.arange(20, 80),
                                 batch_size=100_000)["steps"] == 1
    hook.remove()
    assert seen == [60 + 20]


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA"):
        train.resolve_device("cuda")
    assert train.resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "tpu", "cpu0"])
def test_other_devices_are_one_line(name):
    """mps (a Mac user's first guess) ended in PyTorch's RuntimeError from deep in the bank."""
    with pytest.raises(InputError, match=f"unknown device '{name}': use auto, cpu, cuda or cuda:N"):
        train.resolve_device(name)


def test_a_gpu_index_beyond_the_visible_ones_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="cuda:3: there is no such GPU .1 visible"):
        train.resolve_device("cuda:3")


def test_predictor_takes_numpy_images_as_they_are_stored(cifar_arrays):
    images, _ = cifar_arrays
    torch.manual_seed(0)
    model = build_model("small", 10, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    predicted = train.predictor(model, torch.device("cpu"))(images[:40])
    expected = train.predict_logits(model, torch.from_numpy(images[:40]).permute(0, 3, 1, 2).contiguous()).argmax(1)
    assert predicted.shape == (40,) and (predicted == expected.numpy()).all()


def test_relabel_with_doubt_is_the_argmax_and_one_minus_the_given_labels_probability(cifar_arrays):
    images, _ = cifar_arrays
    torch.manual_seed(0)
    model = build_model("small", 10, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    batch = torch.from_numpy(images[:40]).permute(0, 3, 1, 2).contiguous()
    probs = train.predict_logits(model, batch).softmax(1)
    given = torch.arange(40) % 10
    relabel, doubt = train.relabel_with_doubt(model, batch, given)
    assert relabel.dtype == torch.int64 and torch.equal(relabel, probs.argmax(1))
    assert torch.allclose(doubt, 1 - probs[torch.arange(40), given])
    assert (doubt[given != relabel] >= 0.5 - 1e-6).all()  # another class outranks the given one


def test_class_log_prior_is_the_log_of_each_class_share():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    prior = train.class_log_prior(labels, 4, tau=0.5)
    shares = torch.tensor([6, 3, 1, 1]) / 11  # an empty class counts one sample: no log 0
    assert torch.allclose(prior, 0.5 * shares.log())
    flat = train.class_log_prior(torch.arange(8) % 4, 4)
    assert torch.allclose(flat, flat[:1].expand(4))  # balanced: one value for every class, no change


def test_a_dominant_class_exceeds_the_next_by_more_than_a_poisoning_adds():
    def sized(*sizes):
        return torch.cat([torch.full((size,), label) for label, size in enumerate(sizes)])

    assert train.dominant_class(sized(5, 90, 5), 3) == 1
    assert train.dominant_class(sized(2000, *[333] * 9), 10) == 0  # 40% beside nine equal classes
    assert train.dominant_class(sized(5000 + 2500, *[5000 - 278] * 9), 10) is None  # 5% poisons into class 0
    assert train.dominant_class(sized(60, 40), 2) is None
    assert train.dominant_class(sized(0, 100, 0), 3) is None  # one class: nothing to dominate


def test_taking_the_class_log_prior_from_the_logits_predicts_the_dominant_class_less(cifar_arrays, cifar_classes):
    """Post-hoc logit adjustment (Menon et al., 2021): a model trained where one class fills most of the
    data predicts that class for its size; its logits less the log prior do so far less."""
    images, labels = cifar_arrays
    dominant = (labels == 0).nonzero()[0][:200]
    rest = (labels != 0).nonzero()[0][:120]
    picked = torch.as_tensor(list(dominant) + list(rest))
    bank = Bank.from_arrays(images[picked.numpy()], labels[picked.numpy()], cifar_classes)
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    train.train_supervised(model, bank, epochs=6, batch_size=64, lr=0.05, seed=0)
    held_out = torch.from_numpy(images[(labels != 0).nonzero()[0][200:400]]).permute(0, 3, 1, 2)
    logits = train.predict_logits(model, held_out)
    plain = float((logits.argmax(1) == 0).float().mean())
    adjusted = float(((logits - train.class_log_prior(bank.labels, bank.num_classes)).argmax(1) == 0).float().mean())
    assert adjusted < plain - 0.1, (adjusted, plain)


def test_prior_shift_is_the_log_ratio_of_the_class_shares():
    trained_on, meant_for = sized_labels(2, 6, 2), sized_labels(5, 5, 0)
    shift = train.prior_shift(trained_on, meant_for, 3)
    expected = torch.tensor([2 / 10, 6 / 10, 2 / 10]).log() - torch.tensor([5 / 11, 5 / 11, 1 / 11]).log()
    assert torch.allclose(shift, expected)
    assert torch.allclose(train.prior_shift(meant_for, meant_for, 3), torch.zeros(3))


def sized_labels(*sizes):
    return torch.cat([torch.full((size,), index) for index, size in enumerate(sizes)])


def test_a_logit_shift_trains_a_rare_class_for_the_prior_it_is_meant_for(cifar_arrays, cifar_classes):
    """Class 0 is rare in the training set (8 images beside 60 of each of two others); trained for a balanced
    prior (logit-adjusted loss), the model calls held-out class-0 images class 0 far more often."""
    images, labels = cifar_arrays
    rows = np.concatenate([np.flatnonzero(labels == 0)[:8], np.flatnonzero(labels == 1)[:60],
                           np.flatnonzero(labels == 2)[:60]])
    bank = Bank.from_arrays(images[rows], labels[rows], cifar_classes)
    held_out = torch.from_numpy(images[np.flatnonzero(labels == 0)[8:]]).permute(0, 3, 1, 2)

    def share_called_zero(shift):
        torch.manual_seed(0)
        model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
        train.train_supervised(model, bank, epochs=6, batch_size=32, lr=0.05, seed=0, logit_shift=shift)
        return float((train.predict_logits(model, held_out).argmax(1) == 0).float().mean())

    shift = train.prior_shift(bank.labels, sized_labels(60, 60, 60), bank.num_classes)
    assert shift[0] - shift[1] < -1 and torch.isclose(shift[1], shift[2])  # only differences matter
    plain, shifted = share_called_zero(None), share_called_zero(shift)
    assert shifted > plain + 0.15, (plain, shifted)
