"""The decoded sample bank and batched GPU augmentation.

The whole dataset lives on the device as one uint8 tensor ``[N, 3, H, W]``: it is
four times smaller than float32 and a batch is gathered by indexing, so the
training loop never touches per-sample Python or the host.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Bank:
    """images: uint8 [N, 3, H, W] on ``device``; labels: int64 [N] (the given labels)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, classes: list[str], device="cpu") -> "Bank":
        """Build a bank from uint8 ``[N, H, W, 3]`` images and int ``[N]`` labels.

        The bank's [N, 3, H, W] images keep the array's pixel order (channels_last strides): no second
        copy of the data, which at 224 px is gigabytes; on the CPU they share the array's memory."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
        mean, std = channel_stats(tensor)
        return cls(tensor, torch.as_tensor(labels, dtype=torch.long, device=device), list(classes), mean, std)

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.images.device


def channel_stats(images: torch.Tensor, chunk_values: int = 2**24) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 ``[N, 3, H, W]`` images in [0, 1] units, in chunks of about
    ``chunk_values`` pixel values (two float64 copies of one: 256 MB at most, whatever the image size)."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    chunk = max(1, chunk_values // max(1, math.prod(images.shape[1:])))
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].double().div_(255)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [0, 1]."""
    return images.float().div_(255)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop after reflect padding, then horizontal flip, drawn per sample (``pad`` 0: flip only).

    images: uint8 or float [B, C, H, W]. One gather does the crop for the whole batch.
    """
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images.float(), (pad,) * 4, mode="reflect")
    device = images.device
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    rows = dy[:, None] + torch.arange(height, device=device)
    cols = torch.arange(width, device=device).expand(batch, width)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    batch_idx = torch.arange(batch, device=device)[:, None, None, None]
    chan_idx = torch.arange(images.shape[1], device=device)[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows[:, None, :, None], cols[:, None, None, :]]
    return out.to(images.dtype)


# Training augmentations by name (``augment``'s ``kind``). "crop": the usual CIFAR crop
# with padding, and flip. "flip": the flip alone, which keeps every pixel and its
# neighbours: a small trigger by the border survives it whole, where the crop cuts it
# off in about 40% of views (see AdvrbdOptions.detect_augment).
AUGMENTATIONS = ("crop", "flip", "none")


def augment(images: torch.Tensor, generator: torch.Generator, kind: str = "crop") -> torch.Tensor:
    """Training augmentation ``kind`` (one of AUGMENTATIONS): uint8 [B,3,H,W] -> float32 [B,3,H,W] in [0,1].

    The crop's padding is 1/8 of the shorter side (4 px at 32 px, as is usual for CIFAR): reflect
    padding must be shorter than the side it pads, and an 8x64 image has only 8 rows.
    """
    if kind == "none":
        return to_float(images)
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {AUGMENTATIONS}")
    pad = 0 if kind == "flip" else max(1, min(images.shape[-2:]) // 8)
    return to_float(random_crop_flip(images, generator, pad))


def make_generator(seed: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------
# Contrastive-learning views. Every random setting is drawn per sample, so one
# call on a batch of identical images gives a batch of different views; a
# library transform that draws one setting per call would give the whole batch
# the same crop and colours and leave the contrastive loss nothing to learn.
# All of them take and return float [B, C, H, W] in [0, 1].

# ITU-R BT.601 luma, the weights torchvision uses for grayscale.
_LUMA = (0.299, 0.587, 0.114)


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, copied to the device once: a host-to-GPU copy per call would wait
    for the GPU's queue to drain on every batch."""
    return torch.tensor(values, dtype=dtype, device=device)


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(count, generator=generator, device=generator.device) * (high - low) + low


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of float [B, 3, H, W] -> [B, 1, H, W]."""
    weights = _constant(_LUMA, images.device, images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator, scale=(0.2, 1.0),
                             ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Crop an area fraction in ``scale`` with aspect ratio in ``ratio``, resize it to the input size and
    flip half the crops, each drawn per sample: one affine grid per sample, one ``grid_sample`` per batch.

    torchvision re-draws a crop that does not fit; here its sides are clamped to the image instead.
    """
    batch, _, height, width = images.shape
    area = _uniform(batch, *scale, generator)
    aspect = _uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    crop_width = (area * aspect * height / width).sqrt().clamp(max=1)  # fractions of the side
    crop_height = (area / aspect * width / height).sqrt().clamp(max=1)
    centre_x = _uniform(batch, -1, 1, generator) * (1 - crop_width)  # grid units, crop stays inside
    centre_y = _uniform(batch, -1, 1, generator) * (1 - crop_height)
    flip = torch.where(torch.rand(batch, generator=generator, device=generator.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = crop_width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = crop_height, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def shift_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` with a hue factor per sample: each float [B, 3, H, W] image in [0, 1]
    to HSV, its hue moved by ``turns`` [B] of a full circle, and back; elementwise, so batched."""
    red, green, blue = images.unbind(1)
    value, _ = images.max(1)
    delta = value - images.min(1).values
    saturation = delta / value.clamp_min(1e-12)  # 0 where value is 0 (delta is 0 too)
    spread = torch.where(delta > 0, delta, torch.ones_like(delta))  # grey pixels: any hue, kept at 0
    hue = torch.where(value == red, (green - blue) / spread,
                      torch.where(value == green, 2 + (blue - red) / spread, 4 + (red - green) / spread))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = torch.remainder(hue + turns.to(images.dtype)[:, None, None], 1.0) * 6  # in sixths of the circle
    # back to RGB without a table of the six sectors: channel n (R 5, G 3, B 1) is V - V S clamp(min(k, 4 - k)),
    # k = (n + hue) mod 6; half the time of gathering from the 18 planes of a table
    channels = _constant((5.0, 3.0, 1.0), images.device, images.dtype).view(1, 3, 1, 1)
    sectors = torch.remainder(hue[:, None] + channels, 6)
    return value[:, None] - (value * saturation)[:, None] * torch.minimum(sectors, 4 - sectors).clamp(0, 1)


def color_jitter(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1, p: float = 0.8,
                 sync_free: bool | None = None) -> torch.Tensor:
    """torchvision's ColorJitter with every factor, the order of the four adjustments and whether to jitter
    at all (probability ``p``) drawn per sample. Factors are uniform in [1 - x, 1 + x], hue in [-hue, hue].

    Two ways to one result, bit for bit. By default on a CPU, each of the four slots of the per-sample order
    adjusts only the samples that put each adjustment there: the batch passes through each adjustment once.
    Picking those samples waits for the device, 16 times a batch, so on a GPU (``sync_free``, the default
    there) every sample goes through every slot instead, with identity factors where it chose nothing:
    brightness, contrast and saturation in one fused pass a slot, the costly hue shift once, between the
    slots before each sample's hue and those after it. On a CPU (32 px, batch 512) the first takes 14 ms,
    the second 38, masking 16 whole-batch adjustments (before 2026-11-28) 94.
    """
    batch = images.shape[0]
    sync_free = images.is_cuda if sync_free is None else sync_free
    bright = _per_sample(_uniform(batch, 1 - brightness, 1 + brightness, generator))
    contr = _per_sample(_uniform(batch, 1 - contrast, 1 + contrast, generator))
    satur = _per_sample(_uniform(batch, 1 - saturation, 1 + saturation, generator))
    turns = _uniform(batch, -hue, hue, generator)
    jitter = torch.rand(batch, generator=generator, device=generator.device) < p
    order = torch.rand(batch, 4, generator=generator, device=generator.device).argsort(1)  # 0-3 as below
    if sync_free:
        return _jitter_fused(images, order, jitter, bright, contr, satur, turns)
    adjustments = (  # each on images x of the samples ``chosen``
        lambda x, chosen: x * bright[chosen],
        lambda x, chosen: torch.lerp(grayscale(x).mean((2, 3), keepdim=True).expand_as(x), x, contr[chosen]),
        lambda x, chosen: torch.lerp(grayscale(x).expand_as(x), x, satur[chosen]),
        lambda x, chosen: shift_hue(x, turns[chosen]),
    )
    images = images.clone()
    for slot in range(4):
        for index, adjust in enumerate(adjustments):
            chosen = (jitter & (order[:, slot] == index)).nonzero().squeeze(1)
            if len(chosen):
                images[chosen] = adjust(images[chosen], chosen).clamp(0, 1)
    return images


def _jitter_fused(images, order, jitter, bright, contr, satur, turns) -> torch.Tensor:
    """``color_jitter`` without picking samples. A factor of 1 leaves an image exactly as it is (x * 1, and
    lerp's weight 1 gives its end), so a slot applies brightness, contrast and saturation to the whole batch
    at once, each sample its own or none; only the hue shift, never exact at 0, is masked."""
    one = torch.ones((), device=images.device, dtype=images.dtype)
    hue_slot = (order == 3).int().argmax(1)

    def cheap_slot(x: torch.Tensor, slot: int, applies: torch.Tensor) -> torch.Tensor:
        chosen = torch.where(jitter & applies, order[:, slot], -1)
        scale = torch.where(_per_sample(chosen == 0), bright, one)
        weight = torch.where(_per_sample(chosen == 1), contr, torch.where(_per_sample(chosen == 2), satur, one))
        gray = grayscale(x)
        towards = torch.where(_per_sample(chosen == 1), gray.mean((2, 3), keepdim=True), gray)
        return torch.lerp(towards.expand_as(x), x * scale, weight).clamp(0, 1)

    for slot in range(3):  # the slots before each sample's hue shift (never the last)
        images = cheap_slot(images, slot, slot < hue_slot)
    images = torch.where(_per_sample(jitter), shift_hue(images, turns).clamp(0, 1), images)
    for slot in range(1, 4):  # and after it (never the first)
        images = cheap_slot(images, slot, slot > hue_slot)
    return images


def random_grayscale(images: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace a sample by its luma (in all three channels) with probability ``p``, drawn per sample."""
    chosen = _per_sample(torch.rand(images.shape[0], generator=generator, device=generator.device) < p)
    return torch.where(chosen, grayscale(images).expand_as(images), images)


def gaussian_blur(images: torch.Tensor, generator: torch.Generator, sigma=(0.1, 2.0), p: float = 0.5,
                  kernel_fraction: float = 0.1) -> torch.Tensor:
    """Separable Gaussian blur with probability ``p`` and sigma (pixels) drawn per sample.

    The kernel spans ``kernel_fraction`` of the shorter side, as in SimCLR. Each sample gets its own
    kernel through one grouped convolution over the batch; unblurred samples get the identity kernel.
    """
    batch, channels, height, width = images.shape
    radius = max(1, round(kernel_fraction * min(height, width) / 2))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigmas = _uniform(batch, *sigma, generator).to(images.dtype)
    kernels = torch.exp(-offsets.square() / (2 * sigmas[:, None].square()))
    kernels = kernels / kernels.sum(1, keepdim=True)
    blur = torch.rand(batch, generator=generator, device=generator.device) < p
    kernels = torch.where(blur[:, None], kernels, (offsets == 0).to(images.dtype))
    weights = kernels.repeat_interleave(channels, 0)  # [B*C, k], one kernel per (sample, channel)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), weights[:, None, None, :],
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), weights[:, None, :, None],
                    groups=batch * channels)
    return flat.view(batch, channels, height, width)
