"""DBD: backdoor defense by decoupling the training process.

Paper: ../shared/papers/dbd.txt, Sec. 4 (the three stages), App. B.3 (settings),
App. I (NT-Xent, SCE and MixMatch losses), App. M (other self-supervised methods).

A backdoor forms when supervised training links the trigger to the target label.
Learn the features without labels and that link cannot form; then the poisons,
which keep the features of their source class, stand out by their loss:

1. simclr    self-supervised backbone on the unlabeled images (two views each)
2. head      backbone frozen; a linear head fitted with symmetric cross-entropy (SCE)
3. filter    the ``filter_ratio`` samples with the lowest SCE loss are labeled (of each
             class, ``filter_by_class``), the rest unlabeled (their given label is dropped)
4. mixmatch  the whole model fine-tuned with MixMatch, re-filtering after every epoch
             (within each class, keeping the head filter's count of labeled samples per class)

Outputs: ``score`` = SCE loss of the given label under the final model (higher =
more likely poisoned), ``suspected`` = outside the final labeled set,
``relabel`` = the final model's prediction. No model selection anywhere: the
user has no labelled test set, so the model after the last epoch is the result.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sanitize import train
from sanitize.data import (Bank, augment, color_jitter, gaussian_blur, make_generator, random_grayscale,
                           random_resized_crop_flip, to_float)
from sanitize.formats.records import InputError
from sanitize.methods.base import MethodResult, StageClock
from sanitize.models import SMALL_INPUT, Classifier, build_model

STAGES = ("simclr", "head", "mixmatch")

# Wang et al. (2019) clip log 0 of the one-hot label to log 1e-4 in the reverse cross-entropy.
LOG_ZERO = math.log(1e-4)


@dataclass
class DbdOptions:
    """One set of defaults for every dataset and attack, sized for ResNet-18 on CIFAR-10 in ~10 min on an H100.

    The paper's schedule (SimCLR 100 epochs at batch 512, head 10 epochs, MixMatch
    190 x 1024 steps at batch 64) is ~1,200 supervised epochs of compute. Ours:
    SimCLR 60 epochs (~240 supervised epochs of compute), head on cached features
    (seconds), MixMatch 80 passes over the labeled half (~140 supervised epochs).
    """

    arch: str = "resnet18"
    # Images per step of the network stages (``--batch-size``): SimCLR takes this many pairs,
    # MixMatch half as many labeled samples (plus as many unlabeled ones, two views each),
    # so both stages push about the same number of images through the network per step.
    batch_size: int = 512
    # Stage 1, SimCLR. Batch 512, lr 0.4, weight decay 1e-4 and temperature 0.5 are the
    # official DBD code's settings (the paper's App. A says weight decay 5e-4 and a cosine
    # decay); 512 pairs (1,024 views a step) already fill an H100 at 32 px. The schedule is
    # the engine's: SGD with Nesterov momentum 0.9, a linear warm-up over 15% of the steps,
    # then a linear decay to zero; the lr is not rescaled when --quick shrinks the batch.
    # The paper trains 100 epochs and says a purified, not a well-trained, extractor is the
    # goal (App. K); 60 fit the time budget. The projection head's width is lost in
    # extraction: 128, as in SimCLR.
    ss_epochs: int = 60
    ss_lr: float = 0.4
    ss_weight_decay: float = 1e-4
    temperature: float = 0.5
    projection_dim: int = 128
    crop_scale: float = 0.2  # smallest crop area, official DBD config
    # Stage 2. SCE alpha/beta, Adam lr 0.002 at batch 128 are the paper's. Its 10 epochs on
    # CIFAR-10 are ~4,000 steps; we count steps, not epochs, because an underfit head is
    # the danger: it leans towards the largest class, and the poisons make the target class
    # the largest. Measured (small CNN, planted BadNets, 600 and 4,000 CIFAR images): more
    # steps kept fewer poisons in the labeled half up to ~100 epochs (600 images: 9 -> 3 of
    # 30), none worse after; weight decay 1e-3 was neutral to slightly better, 5e-2 let twice
    # as many in. The head trains on features computed once, without augmentation.
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    head_steps: int = 4000
    head_batch_size: int = 128
    head_lr: float = 0.002
    head_weight_decay: float = 1e-3
    # Stage 3. alpha = 50% (the paper's only key hyper-parameter), T = 0.5, K = 2 views,
    # MixUp Beta(0.75, 0.75) and lambda_u = 15 (CIFAR-10, ramped up linearly over the
    # whole stage as in the official code) are the paper's. Optimiser: the engine's
    # SGD one-cycle instead of Adam 0.002 at batch 64, to take few, large steps.
    # filter_ratio 0.6 / 0.7 gained 3.6 / 5.7 points of ACC at the same ASR on the CPU subset (small
    # CNN, BadNets 5%; benchmarks/RESULTS.md, "The head's filter by class, and MixMatch's settings"),
    # with 13 / 26 poisons labeled at the end instead of 11; 0.7 on Blend 5%: ACC 59.5 -> 65.8, ASR
    # 1.7 -> 2.2, 0 -> 3 poisons labeled at the end. Its safe value depends on the unknown
    # poisoning rate (the paper's App. H.1), so it stays the paper's until ResNet-18 (gpu_session.sh 8).
    filter_ratio: float = 0.5
    # The head's filter takes, of each class, filter_ratio x min(its size, the median class size) of its
    # lowest-loss samples; False: the paper's filter_ratio of all samples at once. Ranked globally, the
    # classes a linear head on self-supervised features finds hard are left with few labeled samples,
    # and MixMatch learns them badly: full CIFAR-10, ResNet-18, BadNets 5% (H100, benchmarks/RESULTS.md,
    # "DBD at full scale"), cat / bird had 972 / 1,196 labeled against 3,669 automobiles, and the clean
    # model got 25.6 / 40.8% of their test images right (97.1% of the automobiles; ACC 72.1 against
    # 88.8 undefended). Capping at the median class size keeps a class the poisons inflated (the target
    # of a dirty-label attack) from getting more labeled samples than the others; within a class, the
    # poisons rank as they would globally, so a class with no poisons only gains clean labeled samples.
    # Measured on 10,000 images (small CNN, CPU, one backbone and head, benchmarks/calibrate_dbd.py):
    # ACC 59.4 -> 59.5, ASR 6.5 -> 5.9, cat / bird / deer 29.2 / 30.9 / 32.6 -> 51.8 / 46.9 / 38.5%,
    # poisons in the head's labeled set 31 -> 19 of 500. ResNet-18 at full scale: gpu_session.sh 7.
    filter_by_class: bool = True
    # MixMatch's per-epoch re-filtering (App. B.3) keeps, of each class, as many labeled samples as
    # the head's filter gave it, the lowest-loss ones; False: the paper's global re-filtering. Ranked
    # globally, a class the model is weak on loses labeled samples, gets weaker and loses more: on
    # 10,000 CIFAR images (small CNN, WaNet 5%; benchmarks/RESULTS.md, "DBD on a CPU subset") bird,
    # cat and deer went from 331 / 247 / 397 labeled after the head to 73 / 8 / 3, and the clean
    # model got 6.7 / 0.7 / 0.1% of their test images right (ACC 52.8 against 70.4 undefended). By
    # class: 29.6 / 26.9 / 29.0%, ACC 59.6, ASR 10.7 -> 5.1, recall 90.0 -> 97.6 (same SimCLR and
    # head). The head's filter, on frozen self-supervised features, is the one that separates the
    # poisons; the re-filtering only chooses within each class which samples stay labeled.
    refilter_by_class: bool = True
    # 40 epochs (the default until 2026-11-27 (9)) took 92 s on the H100 and left ACC 72.1 (global
    # head filter). On the CPU subset (small CNN, one backbone and head, benchmarks/RESULTS.md, "The
    # head's filter by class, and MixMatch's settings") 40 epochs instead of 20 gave ACC 59.5 -> 63.3,
    # 11 -> 6 poisons labeled at the end. 80 keep a ResNet-18 run near 6 minutes (2.3 s an epoch);
    # whether they pay at full scale is gpu_session.sh 7.
    mixmatch_epochs: int = 80
    mixmatch_lr: float = 0.1
    mixmatch_weight_decay: float = 5e-4
    sharpen_temperature: float = 0.5
    unlabeled_views: int = 2
    lambda_u: float = 15.0
    mixup_alpha: float = 0.75
    seed: int = 0
    quick: bool = False

    # The values each numeric option may take (methods.resolve_options enforces them). NT-Xent needs
    # two images a batch; MixMatch needs both a labeled and an unlabeled part.
    BOUNDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "batch_size": (">= 2",), "ss_epochs": (">= 1",), "ss_lr": ("> 0",), "ss_weight_decay": (">= 0", "<= 1"),
        "temperature": ("> 0",), "projection_dim": (">= 1",), "crop_scale": ("> 0", "<= 1"),
        "sce_alpha": (">= 0",), "sce_beta": (">= 0",), "head_steps": (">= 1",), "head_batch_size": (">= 1",),
        "head_lr": ("> 0",), "head_weight_decay": (">= 0", "<= 1"), "filter_ratio": ("> 0", "< 1"),
        "mixmatch_epochs": (">= 1",), "mixmatch_lr": ("> 0",), "mixmatch_weight_decay": (">= 0", "<= 1"),
        "sharpen_temperature": ("> 0",), "unlabeled_views": (">= 1",), "lambda_u": (">= 0",),
        "mixup_alpha": ("> 0",), "seed": (">= 0",)}

    def __post_init__(self):
        if self.sce_alpha == 0 and self.sce_beta == 0:  # every loss 0: the filter's split would be arbitrary
            raise InputError("options sce_alpha and sce_beta cannot both be 0: the head's loss would be 0 for "
                             "every sample, and the labeled set an arbitrary one")

    def scaled(self) -> "DbdOptions":
        """``--quick``: the network stages scaled down for demos and tests (same algorithm).

        The head keeps its steps: on cached features they cost seconds even on a CPU, and
        fewer let more poisons into the labeled half (see ``head_steps``).
        """
        if not self.quick:
            return self
        return replace(self, ss_epochs=min(self.ss_epochs, 5), batch_size=min(self.batch_size, 128),
                       mixmatch_epochs=min(self.mixmatch_epochs, 4))


# ------------------------------------------------------ stage 1: self-supervised
class SelfSupervised(Protocol):
    """A label-free objective for the backbone (Eq. 1). App. M finds MoCo-v2 and BYOL as good as
    SimCLR; either would implement this. Its own parameters (projector, predictor) train with the backbone.
    """

    def parameters(self): ...

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 [B, 3, H, W] -> augmented float views, each [B, 3, H, W] in [0, 1]."""

    def loss(self, model: Classifier, views: list[torch.Tensor]) -> torch.Tensor:
        """Scalar loss of ``model.features`` on ``views``."""

    def train(self, mode: bool = True): ...

    def after_step(self, model: Classifier) -> None:
        """Called after each optimizer step: MoCo's and BYOL's momentum (EMA) encoders update here."""


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5 averaged over all 2B anchors: ``first[i]`` and ``second[i]`` [B, D] are a positive pair,
    every other embedding in the batch is a negative.
    """
    # In float32 even under autocast, which would run the matmul in bf16: similarities near 1 would be
    # rounded to steps of ~0.004, blurring hard negatives against positives (more so as tau shrinks).
    with torch.autocast(first.device.type, enabled=False):
        embeddings = F.normalize(torch.cat([first, second]).float(), dim=1)
        similarity = embeddings @ embeddings.T / temperature
        similarity.fill_diagonal_(float("-inf"))  # k != i in the denominator
        count = first.shape[0]
        partner = torch.arange(2 * count, device=first.device).roll(count)  # i <-> i + B
        return F.cross_entropy(similarity, partner)


class SimCLR(nn.Module):
    """SimCLR (Chen et al., 2020a): two views per image, an MLP projector, NT-Xent on the projections."""

    def __init__(self, feature_dim: int, projection_dim: int, temperature: float, crop_scale: float):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                       nn.Linear(feature_dim, projection_dim))
        self.temperature = temperature
        self.crop_scale = crop_scale

    def view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """SimCLR's augmentation, drawn per sample. Blur only above 64 px: SimCLR leaves it out on
        CIFAR, where a 3-pixel kernel mostly erases the image."""
        views = random_resized_crop_flip(to_float(images), generator, scale=(self.crop_scale, 1.0))
        views = color_jitter(views, generator, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)
        views = random_grayscale(views, generator, p=0.2)
        if max(images.shape[-2:]) > SMALL_INPUT:
            views = gaussian_blur(views, generator, sigma=(0.1, 2.0), p=0.5)
        return views

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [self.view(images, generator), self.view(images, generator)]

    def after_step(self, model: Classifier) -> None:
        """SimCLR keeps no momentum encoder."""

    def loss(self, model: Classifier, views: list[torch.Tensor]) -> torch.Tensor:
        # One forward for both views, so BatchNorm sees the 2B images together.
        projections = self.projector(model.features(train._layout(torch.cat(views))))
        first, second = projections.chunk(2)
        return nt_xent(first, second, self.temperature)


def pretrain_backbone(model: Classifier, objective: SelfSupervised, bank: Bank, opts: DbdOptions,
                      progress: train.Progress | None = None) -> list[float]:
    """Stage 1 on every image, labels unused. Returns the mean loss of each epoch."""
    generator = make_generator(opts.seed, bank.device)
    parameters = [*model.backbone.parameters(), *objective.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=opts.ss_lr, momentum=0.9, nesterov=True,
                                weight_decay=opts.ss_weight_decay)
    batch_size = min(opts.batch_size, bank.n)
    steps = train.steps_per_epoch(bank.n, batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_linear(opts.ss_epochs * steps))
    epoch_loss = torch.zeros(opts.ss_epochs, device=bank.device)  # summed on the device: no sync per step
    model.train()
    objective.train()
    for epoch in range(opts.ss_epochs):
        # drop_last: a short last batch has fewer negatives and a noisier loss.
        for batch in train.batches(train.all_indices(bank), batch_size, generator, drop_last=True):
            views = objective.views(bank.images[batch], generator)
            with train.autocast(bank.device):
                loss = objective.loss(model, views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            objective.after_step(model)
            schedule.step()
            epoch_loss[epoch] += loss.detach().float()
        train.require_finite(epoch_loss[epoch])
        if progress:
            progress(epoch + 1, opts.ss_epochs)
    return rounded(epoch_loss / steps)


# ------------------------------------------------------------ stage 2: SCE head
def sce_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 6 with Wang et al.'s weights, per sample [B]: alpha * CE + beta * reverse CE.

    The reverse CE, -sum_k p_k log q_k with log 0 clipped to log 1e-4, equals
    -log(1e-4) * (1 - p_y): bounded, so a sample the head cannot fit (a poison far
    from its target class) pulls on the head no harder than a merely hard one.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_given = log_probs.gather(1, labels[:, None]).squeeze(1)
    return alpha * -log_given + beta * -LOG_ZERO * (1 - log_given.exp())


@torch.no_grad()
def backbone_features(model: Classifier, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Frozen-backbone features float32 [N, D] of uint8 images, eval mode, no augmentation."""
    model.eval()
    features = []
    for start in range(0, images.shape[0], batch_size):
        with train.autocast(images.device):
            features.append(model.features(train._layout(to_float(images[start:start + batch_size]))).float())
    return torch.cat(features)


def endless_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Shuffled index batches, epoch after epoch."""
    while True:
        yield from train.batches(indices, batch_size, generator)


def train_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, opts: DbdOptions) -> list[float]:
    """Eq. 2 on cached features [N, D]: the backbone is frozen, so its output never changes and
    one forward pass replaces all of the paper's. Returns the mean SCE loss over each tenth of the steps."""
    generator = make_generator(opts.seed + 1, features.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=opts.head_lr, weight_decay=opts.head_weight_decay)
    step_loss = torch.zeros(opts.head_steps, device=features.device)
    indices = torch.arange(len(features), device=features.device)
    batches = itertools.islice(endless_batches(indices, opts.head_batch_size, generator), opts.head_steps)
    for step, batch in enumerate(batches):
        loss = sce_loss(head(features[batch]), labels[batch], opts.sce_alpha, opts.sce_beta).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_loss[step] = loss.detach()
    train.require_finite(step_loss)
    # at most ten parts: fewer steps than ten made empty parts, NaN means, and a manifest JSON refuses
    return rounded(torch.stack([part.mean() for part in step_loss.tensor_split(min(10, opts.head_steps))]))


# ------------------------------------------------------------- stage 3: filter
def split_by_loss(loss: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labeled, unlabeled) index tensors: the ``ratio`` share with the lowest loss is labeled."""
    order = loss.argsort()
    count = min(len(loss) - 1, max(1, round(ratio * len(loss))))
    return order[:count], order[count:]


def split_by_class(loss: torch.Tensor, labels: torch.Tensor, quota: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labeled, unlabeled) index tensors: of each class c, the ``quota[c]`` samples with the lowest loss
    are labeled (``refilter_by_class``)."""
    order = loss.argsort()
    ranked = labels[order]
    grouped = ranked.argsort(stable=True)  # positions of each class together, each class by ascending loss
    sizes = torch.bincount(labels, minlength=len(quota))
    rank = torch.empty_like(grouped)
    rank[grouped] = torch.arange(len(ranked), device=ranked.device) - (sizes.cumsum(0) - sizes)[ranked[grouped]]
    labeled = rank < quota[ranked]
    return order[labeled], order[~labeled]


def class_quota(labels: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    """Labeled samples per class [num_classes] for ``filter_by_class``: ``ratio`` x min(class size,
    median size of the classes present), at least one for each class present. A dominant class
    (``train.dominant_class``: larger than a poisoning makes one) keeps ``ratio`` x its size."""
    sizes = torch.bincount(labels, minlength=num_classes)
    capped = torch.minimum(sizes, sizes[sizes > 0].median())
    dominant = train.dominant_class(labels, num_classes)
    if dominant is not None:
        capped[dominant] = sizes[dominant]
    quota = (ratio * capped.double()).round().long()
    return torch.where(sizes > 0, quota.clamp_min(1), 0)


def head_filter(loss: torch.Tensor, labels: torch.Tensor, num_classes: int,
                opts: DbdOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: (labeled, unlabeled) index tensors from the head's SCE ``loss`` [N]."""
    if opts.filter_by_class:
        quota = class_quota(labels, num_classes, opts.filter_ratio)
        if int(quota.sum()) < len(loss):  # MixMatch needs an unlabeled sample (every class of size 1)
            return split_by_class(loss, labels, quota)
    return split_by_loss(loss, opts.filter_ratio)


def sample_losses(model: Classifier, bank: Bank, opts: DbdOptions) -> torch.Tensor:
    """SCE loss of every sample's given label under ``model``, float32 [N], no augmentation."""
    logits = train.predict_logits(model, bank.images, 1024)
    return sce_loss(logits, bank.labels, opts.sce_alpha, opts.sce_beta)


# ----------------------------------------------------------- stage 4: MixMatch
def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's p^(1/T) / sum p^(1/T), as a softmax of log p / T: the powers underflowed to 0 / 0
    for a small T (0.02 and a near-uniform guess over 10 classes)."""
    return (probs.clamp_min(torch.finfo(probs.dtype).tiny).log() / temperature).softmax(1)


@torch.no_grad()
def guess_labels(model: Classifier, views: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """MixMatch's label guess [B, K]: the sharpened mean prediction over the augmented views."""
    with train.autocast(views[0].device):
        logits = model(train._layout(torch.cat(views))).float()
    mean = logits.softmax(1).view(len(views), -1, logits.shape[1]).mean(0)
    return sharpen(mean, temperature)


def mixmatch_loss(model: Classifier, bank: Bank, labeled: torch.Tensor, unlabeled: torch.Tensor,
                  mix: float, generator: torch.Generator, opts: DbdOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_X, L_U) of Eqs. 7-8 for one batch of labeled and one of unlabeled indices.

    All inputs are mixed with one shuffled copy of themselves and pass through the
    model in a single forward, so BatchNorm sees one batch: MixMatch's 'interleave'
    exists only because its reference code forwards the parts separately.
    """
    inputs = [augment(bank.images[labeled], generator)]
    inputs += [augment(bank.images[unlabeled], generator) for _ in range(opts.unlabeled_views)]
    guess = guess_labels(model, inputs[1:], opts.sharpen_temperature)
    targets = torch.cat([F.one_hot(bank.labels[labeled], bank.num_classes).float()]
                        + [guess] * opts.unlabeled_views)
    inputs = torch.cat(inputs)
    partner = torch.randperm(len(inputs), generator=generator, device=generator.device)
    mixed = torch.lerp(inputs[partner], inputs, mix)
    mixed_targets = torch.lerp(targets[partner], targets, mix)
    with train.autocast(bank.device):
        logits = model(train._layout(mixed)).float()
    count = len(labeled)
    loss_x = -(mixed_targets[:count] * F.log_softmax(logits[:count], 1)).sum(1).mean()
    loss_u = F.mse_loss(logits[count:].softmax(1), mixed_targets[count:])  # mean over samples and classes
    return loss_x, loss_u


def mixmatch_finetune(model: Classifier, bank: Bank, loss: torch.Tensor, opts: DbdOptions,
                      progress: train.Progress | None = None) -> dict:
    """Eq. 3: the whole model, the labeled set (``head_filter`` of ``loss`` [N]) with its labels, the rest without,
    re-filtered after every epoch by the SCE loss under the current model.

    Returns {"loss": final SCE loss [N], "labeled": final labeled indices, "head_labeled": the head
    filter's labeled indices, "history": [epochs, 3]}.
    """
    labeled, unlabeled = head_filter(loss, bank.labels, bank.num_classes, opts)
    head_labeled = labeled
    quota = torch.bincount(bank.labels[labeled], minlength=bank.num_classes) if opts.refilter_by_class else None
    generator = make_generator(opts.seed + 2, bank.device)
    # MixUp weights come from the host: torch cannot draw Beta variates from a seeded generator,
    # and a host draw costs the GPU nothing.
    mixup_rng = np.random.default_rng(opts.seed + 2)
    batch_size = max(1, min(opts.batch_size // 2, len(labeled)))
    steps = len(labeled) // batch_size  # the labeled set's size never changes
    total = opts.mixmatch_epochs * steps
    optimizer = train.make_optimizer(model, opts.mixmatch_lr, opts.mixmatch_weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, train.warmup_linear(total))
    history = torch.zeros(opts.mixmatch_epochs, 3, device=bank.device)  # L_X, L_U, samples that changed set
    for epoch in range(opts.mixmatch_epochs):
        model.train()
        unlabeled_order = unlabeled[torch.randperm(len(unlabeled), generator=generator, device=generator.device)]
        for step, batch in enumerate(train.batches(labeled, batch_size, generator, drop_last=True)):
            # The unlabeled set may be larger or smaller than the labeled one: walk it cyclically.
            cursor = (step * batch_size + torch.arange(batch_size, device=bank.device)) % len(unlabeled_order)
            mix = float(mixup_rng.beta(opts.mixup_alpha, opts.mixup_alpha))
            loss_x, loss_u = mixmatch_loss(model, bank, batch, unlabeled_order[cursor], max(mix, 1 - mix),
                                           generator, opts)
            ramp = min(1.0, (epoch * steps + step + 1) / total)
            optimizer.zero_grad(set_to_none=True)
            (loss_x + opts.lambda_u * ramp * loss_u).backward()
            optimizer.step()
            schedule.step()
            history[epoch, :2] += torch.stack([loss_x.detach(), loss_u.detach()]) / steps
        previous = labeled
        loss = sample_losses(model, bank, opts)
        labeled, unlabeled = (split_by_loss(loss, opts.filter_ratio) if quota is None
                              else split_by_class(loss, bank.labels, quota))
        history[epoch, 2] = len(labeled) - torch.isin(labeled, previous).sum()
        train.require_finite(history[epoch])
        if progress:
            progress(epoch + 1, opts.mixmatch_epochs)
    return {"loss": loss, "labeled": labeled, "head_labeled": head_labeled, "history": history}


# ------------------------------------------------------------------------- run
def decouple(bank: Bank, opts: DbdOptions, clock: StageClock) -> tuple[Classifier, list, list, torch.Tensor]:
    """Stages 1-2 on a fresh model (seeded by ``opts.seed``): the self-supervised backbone, then the SCE head
    on its frozen features. Returns (the model, SimCLR loss per epoch, head loss per tenth of its steps, the
    head's SCE loss per sample [N])."""
    torch.manual_seed(opts.seed)
    model = train.prepare(build_model(opts.arch, bank.num_classes, bank.image_size, bank.mean, bank.std),
                          bank.device)
    objective = SimCLR(model.feature_dim, opts.projection_dim, opts.temperature, opts.crop_scale).to(bank.device)
    with clock("simclr"):
        ss_loss = pretrain_backbone(model, objective, bank, opts, clock.advance)
    with clock("head"):
        features = backbone_features(model, bank.images)
        head_loss = train_head(model.head, features, bank.labels, opts)
        with torch.no_grad():
            first_loss = sce_loss(model.head(features), bank.labels, opts.sce_alpha, opts.sce_beta)
    return model, ss_loss, head_loss, first_loss


def run(bank: Bank, options: DbdOptions, progress=None) -> MethodResult:
    """DBD over the whole bank. See the module docstring for the stages."""
    opts = options  # as given: scaling for --quick is the caller's (methods.resolve_options)
    clock = StageClock(bank.device, progress)
    model, ss_loss, head_loss, first_loss = decouple(bank, opts, clock)
    with clock("mixmatch"):
        final = mixmatch_finetune(model, bank, first_loss, opts, clock.advance)
        relabel, doubt = train.relabel_with_doubt(model, bank.images, bank.labels)
    model.eval()

    suspected = torch.ones(bank.n, dtype=torch.bool, device=bank.device)
    suspected[final["labeled"]] = False
    head_labeled = torch.zeros_like(suspected)
    head_labeled[final["head_labeled"]] = True
    history = final["history"].cpu()
    metrics = {"simclr_loss": ss_loss, "head_loss": head_loss,
               "mixmatch_loss_x": rounded(history[:, 0]), "mixmatch_loss_u": rounded(history[:, 1]),
               "labeled_changed": [int(v) for v in history[:, 2]],
               "labeled_fraction": round(1 - float(suspected.float().mean()), 4),
               "suspected": int(suspected.sum())}
    return MethodResult(score=final["loss"].double().cpu().numpy(), suspected=suspected.cpu().numpy(),
                        relabel=relabel.cpu().numpy().astype(np.int64), model=model,
                        timings_s=clock.timings_s, metrics=metrics,
                        warnings=unlabeled_classes_warning(bank.labels, suspected, bank.classes),
                        details={"head_loss": first_loss.cpu().numpy(), "head_labeled": head_labeled.cpu().numpy(),
                                 "relabel_doubt": doubt.cpu().numpy()})


# The paper's filter (filter_by_class=False) ranks all samples at once, so where one class holds most
# of the data the labeled share can come from it alone: 5,000 CIFAR images, airplane 60% (small CNN,
# --quick), every image of the nine other classes was suspected (benchmarks/RESULTS.md, "DBD where
# one class dominates"). MixMatch then learns those classes from unlabeled consistency only, and the
# user must hear it. The filter by class gives every class present at least one labeled sample.
def unlabeled_classes_warning(labels: torch.Tensor, suspected: torch.Tensor, classes: list[str]) -> list[str]:
    """A warning naming the classes with samples of which none is in the final labeled set, or none."""
    present = torch.bincount(labels, minlength=len(classes)) > 0
    labeled = torch.bincount(labels[~suspected], minlength=len(classes)) > 0
    missing = [classes[index] for index in (present & ~labeled).nonzero()[:, 0].tolist()]
    if not missing:
        return []
    shown = ", ".join(repr(name) for name in missing[:10])
    shown += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return [f"no sample of {len(missing)} class(es) is in the labeled set ({shown}): all of them are suspected, "
            f"and the clean model and relabels learned them from unlabeled data only; a class that dominates "
            f"the data can crowd the others out of the labeled half (try --method advrbd)"]


def rounded(values: torch.Tensor) -> list[float]:
    return [round(v, 5) for v in values.tolist()]
