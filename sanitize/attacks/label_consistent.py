"""Label-Consistent (Turner et al., 2019, "Label-consistent backdoor attacks").

Clean-label: only target-class images are poisoned and they keep their label.
To make the model rely on the trigger rather than on the images' own (easy)
features, each is first made hard to classify: an untargeted L-inf PGD
perturbation against a surrogate model trained on the same data. Then the
four-corner checkerboard is stamped (Sec. 4: in all corners, so random crops and
flips keep some of it in view).

Turner et al. use eps = 8/255 (and 16/255). PGD steps and step size follow the
BackdoorBox implementation of the attack (100 steps of 1.5/255). Deviations:
the surrogate is trained with our engine (not adversarially trained), and the
reduced-amplitude trigger is an opacity (``amplitude`` 1 = Turner's full
trigger) rather than an additive +-amplitude.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sanitize import train
from sanitize.attacks.base import Attack, check_fraction, to_uint8
from sanitize.attacks.patterns import CANVAS, Stamp, four_corner_checkerboard
from sanitize.data import Bank, make_generator
from sanitize.formats.records import InputError
from sanitize.models import ARCHS, build_model


@dataclass
class LabelConsistent(Attack):
    """``size``: side of each corner checkerboard on a 32 px image. ``amplitude``: training trigger
    opacity (the test trigger is always full). ``eps``/``step_size`` in [0, 1] pixel units.
    ``epochs``/``batch_size``/``lr``: surrogate training. ``device``: where the surrogate runs."""

    name = "label_consistent"
    clean_label = True
    stages = ("surrogate", "pgd")  # minutes on a CPU: the user sees each and its steps
    size: int = 3
    amplitude: float = 1.0
    eps: float = 8 / 255
    step_size: float = 1.5 / 255
    pgd_steps: int = 100
    surrogate_arch: str = "resnet18"
    # A cost choice: PGD needs the surrogate's gradients to point at class evidence, not a
    # converged model.
    epochs: int = 15
    batch_size: int = 512
    lr: float = 0.2
    device: str = "cpu"

    def __post_init__(self):
        if not 1 <= self.size <= CANVAS // 2:
            raise InputError(f"size must be between 1 and {CANVAS // 2}, got {self.size}")
        if self.surrogate_arch not in ARCHS:
            raise InputError(f"unknown surrogate_arch {self.surrogate_arch!r}; "
                             f"choose one of {', '.join(sorted(ARCHS))}")
        for name in ("amplitude", "eps", "step_size"):
            check_fraction(name, getattr(self, name))
        for name in ("pgd_steps", "epochs", "batch_size"):  # 0 steps or epochs: no attack, only the corners
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be above 0, got {self.lr}")

    @property
    def corners(self) -> Stamp:
        return four_corner_checkerboard(self.size)

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.corners.apply(images)

    def stamp(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.corners.apply(images, self.amplitude)

    def stamp_poisons(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                      rng: np.random.Generator, num_classes: int, seed: int, progress=None) -> np.ndarray:
        if len(rows) == 0:
            return images[rows]
        device = train.resolve_device(self.device)
        if progress:
            progress.stage("surrogate")
        surrogate = self.train_surrogate(images, labels, num_classes, seed, device,
                                         progress.advance if progress else None)
        self._surrogate = (surrogate, seed, device, images.shape[1:3])  # for ``restamp`` (not a parameter)
        if progress:
            progress.stage("pgd")
        hard = self.pgd(surrogate, images[rows], labels[rows], seed, device, progress.advance if progress else None)
        return to_uint8(self.stamp(hard, rng))

    def restamp(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                cover: bool) -> np.ndarray:
        """The PGD perturbation found at the surrogate's size, resized onto the images, then the corners
        (there are no covers). The surrogate never sees another size: a 10 px image is too small for
        a model built for 224 px ones, and a photo's PGD at full size would take gigabytes."""
        if cover or len(images) == 0:
            return super().restamp(images, labels, rng, cover=cover)
        surrogate, seed, device, working = self._surrogate
        own = tuple(images.shape[1:3])
        small = to_uint8(_resize(images.astype(np.float32), working))
        delta = _resize(self.pgd(surrogate, small, labels, seed, device) - small, own)
        bound = self.eps * 255
        return to_uint8(self.stamp(np.clip(images + np.clip(delta, -bound, bound), 0, 255), rng))

    def train_surrogate(self, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
                        device: torch.device, progress: train.Progress | None = None) -> torch.nn.Module:
        bank = Bank.from_arrays(images, labels, [str(k) for k in range(num_classes)], device)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = build_model(self.surrogate_arch, num_classes, bank.image_size, bank.mean, bank.std)
        model = train.prepare(model, device)
        train.train_supervised(model, bank, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                               progress=progress)
        return model.eval()

    def pgd(self, model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, seed: int,
            device: torch.device, progress: train.Progress | None = None) -> np.ndarray:
        """Untargeted L-inf PGD with a random start: uint8 [n, H, W, 3] -> float32 [n, H, W, 3] in 0..255.

        ``progress(done, total)`` after each batch, counting samples."""
        generator = make_generator(seed, device)
        hard = []
        for start in range(0, len(images), self.batch_size):
            clean = torch.from_numpy(images[start:start + self.batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            truth = torch.as_tensor(labels[start:start + self.batch_size], device=device)
            delta = (torch.rand(clean.shape, generator=generator, device=device) * 2 - 1) * self.eps
            for _ in range(self.pgd_steps):
                delta = self.ascend(model, clean, truth, delta)
            hard.append(((clean + delta).clamp(0, 1) * 255).permute(0, 2, 3, 1).cpu().numpy())
            if progress:
                progress(start + len(clean), len(images))
        return np.concatenate(hard)

    def ascend(self, model, clean: torch.Tensor, truth: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """One PGD step: raise the loss of the true label, stay inside the eps ball and [0, 1]."""
        delta.requires_grad_(True)
        with train.autocast(clean.device):
            loss = F.cross_entropy(model((clean + delta).clamp(0, 1)).float(), truth)
        gradient, = torch.autograd.grad(loss, delta)
        return (delta.detach() + self.step_size * gradient.sign()).clamp(-self.eps, self.eps)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [n, h, w, 3] -> [n, *size, 3], bilinear (antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).numpy()
