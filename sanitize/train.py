"""Training, unlearning and evaluation loops shared by the methods.

Every loop draws its batches from the on-device :class:`~sanitize.data.Bank` by
index, augments on the device, and runs under bf16 autocast with channels_last
on CUDA (float32 on CPU). Nothing here knows about files.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sanitize.data import Bank, augment, make_generator, to_float
from sanitize.formats.records import InputError

Progress = Callable[[int, int], None]  # (done, total) per step


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present. Asking for CUDA without it is the user's error, as is any
    other kind of device (mps, xpu, meta, ...): the engine is built and tested for CUDA and the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cuda", "cpu"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available (try --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"unknown device {name!r}: {error}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there is no such GPU ({torch.cuda.device_count()} visible)")
    return device


def configure_determinism() -> None:
    # Same device + seed -> same manifest: fixed cuDNN algorithms, no autotuning.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@contextlib.contextmanager
def deterministic(device: torch.device):
    """``configure_determinism`` for a run, after which the caller's random state (CPU, and ``device``'s
    if a GPU) and cuDNN flags are put back: a notebook's own seeds and speed settings are not ours."""
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    gpus = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        configure_determinism()
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _layout(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


def batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator | None,
            drop_last: bool = False, min_size: int = 1) -> Iterator[torch.Tensor]:
    """Index batches over ``indices``, shuffled when a generator is given.

    ``drop_last``: no short last batch when there is a full one. ``min_size``: no last batch
    smaller than that when there is another (training passes TRAIN_MIN_BATCH).
    """
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator, device=generator.device)
                          .to(indices.device)]
    stop = _batched(len(indices), batch_size, drop_last, min_size)
    for start in range(0, stop, batch_size):
        yield indices[start:start + batch_size]


# BatchNorm cannot train on a batch of one sample whose features are 1x1 (an 8-15 px image
# through the small CNN, a 32 px one through ResNet-18's last stage): training drops a last
# batch of one; the sample is drawn into another batch in the next epoch.
TRAIN_MIN_BATCH = 2


def _batched(count: int, batch_size: int, drop_last: bool, min_size: int) -> int:
    """How many of ``count`` shuffled indices ``batches`` yields."""
    if drop_last and count >= batch_size:
        return count - count % batch_size
    if count > batch_size and 0 < count % batch_size < min_size:
        return count - count % batch_size
    return count


DIVERGED = ("training diverged: the loss became NaN or infinite; lower the learning rate, or undo other values "
            "set with --set or --config")


def require_finite(value: torch.Tensor) -> None:
    """Stop a diverged training with one line for the user, not a traceback after all the compute.
    It waits for the device: call it once per epoch, not per step."""
    if not bool(torch.isfinite(value).all()):
        raise InputError(DIVERGED)


def batch_count(count: int, batch_size: int, drop_last: bool, min_size: int = 1) -> int:
    """How many batches ``batches`` yields over ``count`` indices (the schedule and progress count on it)."""
    return math.ceil(_batched(count, batch_size, drop_last, min_size) / batch_size)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return max(1, count // batch_size) if count >= batch_size else 1


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def warmup_linear(total_steps: int, warmup_fraction: float = 0.15) -> Callable[[int], float]:
    """LR factor per step: linear warm-up, then linear decay to zero (one-cycle shape)."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def all_indices(bank: Bank) -> torch.Tensor:
    return torch.arange(bank.n, device=bank.device)


def train_supervised(model: torch.nn.Module, bank: Bank, *, indices: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, epochs: int = 20, batch_size: int = 512,
                     lr: float = 0.2, weight_decay: float = 5e-4, seed: int = 0, augmentation: str = "crop",
                     logit_shift: torch.Tensor | None = None, forget: torch.Tensor | None = None,
                     forget_share: float = 0.125, progress: Progress | None = None) -> dict:
    """Cross-entropy training on ``indices`` (default: all samples), each batch augmented as ``augmentation``
    (``sanitize.data.AUGMENTATIONS``; "none" for none).

    ``labels`` [N] overrides the bank's given labels (used for relabeled fine-tuning).
    ``logit_shift`` [K], if given, is added to the logits in the loss only (logit-adjusted loss, Menon et
    al. 2021): with ``prior_shift(trained_on, meant_for)`` the model learns the class prior of the labels
    it is meant for, not of the ones it sees.
    ``forget``, if given, is a set of sample indices unlearned beside each batch (``unlearning_loss`` of the
    bank's given labels, weight 1), as many a batch as ``unlearn_relearn`` unlearns (``unlearn_batch_size``).
    Its draws and augmentation come from a generator of their own: the batches learned are the ones drawn
    without it.
    Returns ``{"loss": last-epoch mean loss, "steps": n}``.
    """
    indices = all_indices(bank) if indices is None else indices.to(bank.device)
    labels = bank.labels if labels is None else labels.to(bank.device)
    if len(indices) < TRAIN_MIN_BATCH or epochs <= 0:  # BatchNorm cannot train on one sample
        return {"loss": float("nan"), "steps": 0}
    generator = make_generator(seed, bank.device)
    forget = None if forget is None or len(forget) == 0 else forget.to(bank.device)
    forget_generator = make_generator(seed + 1, bank.device)
    forget_size = 0 if forget is None else unlearn_batch_size(batch_size, len(forget), len(indices), forget_share)
    drop_last = len(indices) >= 2 * batch_size  # avoids a 1-sample BatchNorm batch
    # The schedule decays to zero over the steps actually taken: counted without the dropped
    # remainder (it used to be counted, so the rate ended at up to a sixth of its peak on small sets).
    total = epochs * batch_count(len(indices), batch_size, drop_last, TRAIN_MIN_BATCH)
    optimizer = make_optimizer(model, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total))
    model.train()
    step, loss_sum, count = 0, torch.zeros((), device=bank.device), 0
    for _ in range(epochs):
        loss_sum.zero_()
        count = 0
        for batch in batches(indices, batch_size, generator, drop_last, TRAIN_MIN_BATCH):
            inputs = augment(bank.images[batch], generator, augmentation)
            if forget is not None:
                picked = forget[torch.randint(0, len(forget), (forget_size,), generator=forget_generator,
                                              device=bank.device)]
                inputs = torch.cat([inputs, augment(bank.images[picked], forget_generator, augmentation)])
            with autocast(bank.device):
                logits = model(_layout(inputs))
                learned = logits[:len(batch)]
                if logit_shift is not None:
                    learned = learned.float() + logit_shift
                loss = F.cross_entropy(learned, labels[batch])
                if forget is not None:
                    loss = loss + unlearning_loss(logits[len(batch):], bank.labels[picked])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach().float()
            count += 1
            step += 1
            if progress:
                progress(step, total)
        require_finite(loss_sum)
    return {"loss": float(loss_sum / max(1, count)), "steps": step}


def class_log_prior(labels: torch.Tensor, num_classes: int, tau: float = 1.0) -> torch.Tensor:
    """``tau * log(class share)`` float32 [K] of the given ``labels`` (an empty class counts one sample).

    Taken from a trained model's logits (post-hoc logit adjustment, Menon et al., ICLR 2021), it
    removes the class prior the model learned from the data: a class that fills most of the data is
    no longer predicted for its size. On balanced data it is the same for every class, and changes
    nothing."""
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
    return tau * (counts / counts.sum()).log()


# A largest class that exceeds the next one by more than this share of the data is the data's own,
# not a backdoor's doing: a poisoning adds at most its own poisons to a class, and no backdoor
# poisons 30% of a dataset (the benchmark's highest rate is 20%); a "normal" class beside rare ones
# (defect or medical data) does.
DOMINANT_EXCESS = 0.3


def dominant_class(labels: torch.Tensor, num_classes: int) -> int | None:
    """The class that exceeds the next largest by more than DOMINANT_EXCESS of the samples, or None
    (also where fewer than two classes have samples: nothing to dominate)."""
    sizes = torch.bincount(labels, minlength=num_classes)
    if int((sizes > 0).sum()) < 2:
        return None
    top = sizes.topk(2)
    if float(top.values[0] - top.values[1]) > DOMINANT_EXCESS * float(sizes.sum()):
        return int(top.indices[0])
    return None


def prior_shift(trained_on: torch.Tensor, meant_for: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``log(class share in trained_on) - log(class share in meant_for)`` float32 [K], both label vectors:
    the ``logit_shift`` that trains a model on ``trained_on`` for the class prior of ``meant_for``.
    Zero where the shares agree (an empty class counts one sample)."""
    return class_log_prior(trained_on, num_classes) - class_log_prior(meant_for, num_classes)


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bounded unlearning: minimise -log(1 - p_y), i.e. drive the given label's probability to 0.

    Plain gradient ascent on cross-entropy is unbounded and blows the network up in a
    few steps; this loss reaches the same goal and is 0 once the label is unlearned.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).mean()


def unlearn_batch_size(batch_size: int, unlearn_count: int, learn_count: int, share: float) -> int:
    """Samples unlearned beside a batch of ``batch_size`` learned: the unlearn set's share of both sets,
    but at least ``share`` of the batch (and one), so that a small set is seen many times an epoch."""
    return max(1, round(batch_size * unlearn_count / max(1, learn_count + unlearn_count)), round(batch_size * share))


def unlearn_relearn(model: torch.nn.Module, bank: Bank, *, unlearn: torch.Tensor, relearn: torch.Tensor,
                    epochs: int = 1, batch_size: int = 512, lr: float = 0.01, unlearn_weight: float = 1.0,
                    unlearn_share: float = 0.125, weight_decay: float = 5e-4, seed: int = 0,
                    augmentation: str = "crop", progress: Progress | None = None) -> dict:
    """One pass over ``relearn`` (descent) with each step also unlearning a batch of ``unlearn``.

    The unlearn batch is drawn with replacement at the set's relative size, but at least
    ``unlearn_share`` of ``batch_size``, so a small unlearn set is seen many times per
    epoch: it is the signal the enhancement amplifies.
    """
    if len(unlearn) == 0 or len(relearn) == 0 or epochs <= 0:  # nothing to do (a tiny set's every sample unlearned)
        return {"learn_loss": float("nan"), "forget_loss": float("nan"), "steps": 0}
    batch_size = min(batch_size, len(relearn) + len(unlearn))  # a batch of 100,000 on 80 images took 24 GB
    generator = make_generator(seed, bank.device)
    optimizer = make_optimizer(model, lr, weight_decay)
    unlearn_batch = unlearn_batch_size(batch_size, len(unlearn), len(relearn), unlearn_share)
    drop_last = len(relearn) >= 2 * batch_size
    total = epochs * batch_count(len(relearn), batch_size, drop_last, TRAIN_MIN_BATCH)
    model.train()
    step = 0
    for _ in range(epochs):
        for batch in batches(relearn, batch_size, generator, drop_last, TRAIN_MIN_BATCH):
            pick = torch.randint(0, len(unlearn), (unlearn_batch,), generator=generator, device=bank.device)
            forget = unlearn[pick]
            inputs = _layout(augment(bank.images[torch.cat([batch, forget])], generator, augmentation))
            with autocast(bank.device):
                logits = model(inputs).float()
            learn_loss = F.cross_entropy(logits[:len(batch)], bank.labels[batch])
            forget_loss = unlearning_loss(logits[len(batch):], bank.labels[forget])
            loss = learn_loss + unlearn_weight * forget_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if progress:
                progress(step, total)
        require_finite(learn_loss.detach() + forget_loss.detach())
    return {"learn_loss": float(learn_loss.detach()), "forget_loss": float(forget_loss.detach()), "steps": step}


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits float32 [N, K] for uint8 [N, 3, H, W] images, no augmentation."""
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        inputs = _layout(to_float(images[start:start + batch_size]))
        with autocast(images.device):
            outputs.append(model(inputs).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 0, device=images.device)


def relabel_with_doubt(model: torch.nn.Module, images: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's label for each uint8 image, int64 [N], and its doubt in the given ``labels``, float32 [N]:
    one minus the softmax probability it gives the given label (higher = the label is less likely right)."""
    logits = predict_logits(model, images)
    given = logits.softmax(1).gather(1, labels.to(logits.device).view(-1, 1)).squeeze(1)
    return logits.argmax(1), 1 - given


def predictor(model: torch.nn.Module, device: torch.device):
    """``model`` as a function: uint8 numpy images [N, H, W, 3] -> predicted labels, numpy int64 [N]."""
    def predict(images: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()
        return predict_logits(model, tensor).argmax(1).cpu().numpy()

    return predict


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent (0-100) on uint8 images."""
    if images.shape[0] == 0:
        return float("nan")
    predictions = predict_logits(model, images, batch_size).argmax(1)
    return float((predictions == labels.to(predictions.device)).float().mean() * 100)
