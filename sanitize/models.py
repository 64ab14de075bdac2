"""Architectures by name. Random init only: no hub weights, no downloads.

Every model is a :class:`Classifier`: input float ``[N, 3, H, W]`` RGB in [0, 1],
normalisation inside (so the exported ONNX graph carries it), a ``backbone``
giving a feature vector and a linear ``head`` — the split DBD needs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tv

ARCHS: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {}

# Inputs whose shorter side is up to this use a CIFAR-style stem (3x3 conv, no max-pool); an
# ImageNet stem would shrink a 32 px image to 1x1 before the last stage. The shorter side: 4x64
# images, scaled up to 8x128, went through the small CNN's 4x pooling stem to a side of 0.
SMALL_INPUT = 64


def register(name: str):
    def add(factory):
        ARCHS[name] = factory
        return factory

    return add


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(factory, small_input: bool) -> tuple[nn.Module, int]:
    net = factory(weights=None)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@register("resnet18")
def resnet18(small_input: bool):
    return _resnet(tv.resnet18, small_input)


@register("resnet34")
def resnet34(small_input: bool):
    return _resnet(tv.resnet34, small_input)


@register("mobilenetv2")
def mobilenetv2(small_input: bool):
    net = tv.mobilenet_v2(weights=None)
    if small_input:
        # Stride 1 in the first conv keeps a 32 px input at 4x4 before pooling.
        net.features[0][0].stride = (1, 1)
    net.classifier = nn.Identity()
    return net, net.last_channel


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@register("small")
def small(small_input: bool):
    """A compact CNN (~0.3M parameters) that trains in seconds on a CPU: for tests and the demo."""
    stem = [] if small_input else [nn.AvgPool2d(4)]
    net = nn.Sequential(
        *stem,
        *_conv_bn(3, 32), nn.MaxPool2d(2),
        *_conv_bn(32, 64), nn.MaxPool2d(2),
        *_conv_bn(64, 128), nn.MaxPool2d(2),
        *_conv_bn(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return net, 128


def build_model(arch: str, num_classes: int, image_size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Classifier:
    """A freshly initialised :class:`Classifier` for ``image_size`` (int or (H, W))."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    side = min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
    backbone, dim = ARCHS[arch](side <= SMALL_INPUT)
    return Classifier(backbone, dim, num_classes, mean, std)
