"""The decoded sample bank and batched GPU augmentation.

The whole dataset lives on the device as one uint8 tensor ``[N, 3, H, W]``: it is
four times smaller than float32 and a batch is gathered by indexing, so the
training loop never touches per-sample Python or the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
        """Build a bank from uint8 ``[N, H, W, 3]`` images and int ``[N]`` labels."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous()
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


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 ``[N, 3, H, W]`` images in [0, 1] units, chunked to bound memory."""
    total = torch.zeros(3, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
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
    """Random crop after reflect padding, then horizontal flip, drawn per sample.

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


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard training augmentation: uint8 [B,3,H,W] -> float32 [B,3,H,W] in [0,1].

    Padding is 1/8 of the side (4 px at 32 px, as is usual for CIFAR).
    """
    pad = max(1, images.shape[-1] // 8)
    return to_float(random_crop_flip(images, generator, pad))


def make_generator(seed: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
