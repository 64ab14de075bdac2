import pytest
import torch

from sanitize.formats.images import MIN_SIDE
from sanitize.models import ARCHS, build_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("side", [MIN_SIDE, 32, 96])  # MIN_SIDE: the smallest working size
def test_every_arch_gives_logits_and_features(arch, side):
    model = build_model(arch, num_classes=7, image_size=side).eval()
    with torch.no_grad():
        inputs = torch.rand(2, 3, side, side)
        logits = model(inputs)
        features = model.features(inputs)
    assert logits.shape == (2, 7)
    assert features.shape == (2, model.feature_dim)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("size", [(MIN_SIDE, 128), (128, MIN_SIDE), (40, 224), (320, MIN_SIDE)])
def test_every_arch_takes_thin_images(arch, size):
    """4x64 images scaled up to 8x128 took the small CNN's 4x pooling stem (the longer side was over 64) and
    pooled to a side of 0: a traceback in both methods (the audit). The shorter side picks the stem."""
    model = build_model(arch, num_classes=3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, *size)).shape == (2, 3)


def test_small_input_uses_cifar_stem():
    assert build_model("resnet18", 10, 32).backbone.conv1.stride == (1, 1)
    assert build_model("resnet18", 10, 224).backbone.conv1.stride == (2, 2)


def test_normalisation_is_inside_the_model():
    model = build_model("small", 3, 32, mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5))
    x = torch.full((1, 3, 4, 4), 0.4)
    assert torch.allclose(model.normalize(x)[0, :, 0, 0], torch.tensor([0.4, 0.0, -0.4]))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg", 10, 32)
