import numpy as np
import pytest
import torch

from sanitize.data import Bank, augment, channel_stats, make_generator, random_crop_flip


def test_bank_keeps_uint8_rows_in_order(cifar_arrays, cifar_classes):
    images, labels = cifar_arrays
    bank = Bank.from_arrays(images, labels, cifar_classes)
    assert bank.images.dtype == torch.uint8 and bank.images.shape == (len(images), 3, 32, 32)
    assert bank.n == len(images) and bank.num_classes == 10 and bank.image_size == (32, 32)
    assert np.array_equal(bank.images[7].permute(1, 2, 0).numpy(), images[7])
    assert bank.labels.tolist() == labels.tolist()


def test_bank_rejects_wrong_layout(cifar_arrays, cifar_classes):
    images, labels = cifar_arrays
    with pytest.raises(ValueError, match="uint8"):
        Bank.from_arrays(images.astype(np.float32), labels, cifar_classes)


def test_channel_stats_match_numpy(cifar_arrays):
    images, _ = cifar_arrays
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    mean, std = channel_stats(tensor, chunk_values=64 * 3 * 32 * 32 + 5)  # several chunks, the last one short
    scaled = images.astype(np.float64) / 255
    assert np.allclose(mean, scaled.mean((0, 1, 2)), atol=1e-9)
    assert np.allclose(std, scaled.std((0, 1, 2)), atol=1e-9)


def test_the_bank_shares_the_decoded_array_instead_of_copying_it(cifar_arrays, cifar_classes):
    """At 224 px a second copy of 50,000 images is 7.5 GB: the bank is a channels_last view of the array."""
    images, labels = cifar_arrays
    bank = Bank.from_arrays(images, labels, cifar_classes)
    assert bank.images.shape == (len(images), 3, 32, 32) and bank.images.data_ptr() == images.ctypes.data
    assert torch.equal(bank.images[5], torch.from_numpy(images[5]).permute(2, 0, 1))
    assert bank.images.is_contiguous(memory_format=torch.channels_last)


def test_crop_flip_is_drawn_per_sample():
    # 64 copies of one image: a per-batch draw would give 64 identical outputs.
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).view(1, 3, 16, 16) % 251
    out = random_crop_flip(image.repeat(64, 1, 1, 1), make_generator(0, "cpu"), pad=2)
    distinct = {tuple(row.flatten().tolist()) for row in out}
    assert len(distinct) > 10
    assert out.shape == (64, 3, 16, 16)


def test_crop_flip_is_a_shifted_view_of_the_padded_image():
    image = torch.rand(1, 3, 8, 8)
    out = random_crop_flip(image.repeat(32, 1, 1, 1), make_generator(1, "cpu"), pad=1)
    padded = torch.nn.functional.pad(image, (1,) * 4, mode="reflect")[0]
    for row in out:
        windows = [padded[:, y:y + 8, x:x + 8] for y in range(3) for x in range(3)]
        assert any(torch.equal(row, w) or torch.equal(row, w.flip(-1)) for w in windows)


def test_a_corner_trigger_survives_every_flip_but_not_every_crop(cifar_arrays, cifar_classes):
    # A white 3x3 patch in the bottom-right corner, as BadNets stamps it. The usual crop
    # (4 px of padding) cuts it off in about 40% of views; the flip keeps it whole, in
    # one bottom corner or the other.
    bank = Bank.from_arrays(*cifar_arrays, cifar_classes)
    images = bank.images[:200].clone()
    images[:, :, -3:, -3:] = 255
    flipped = augment(images, make_generator(0, "cpu"), "flip")
    right = (flipped[:, :, -3:, -3:] == 1).flatten(1).all(1)
    left = (flipped[:, :, -3:, :3] == 1).flatten(1).all(1)
    assert bool((right | left).all()) and 0.3 < float(left.float().mean()) < 0.7
    for view, image in zip(flipped, images.float() / 255):
        assert torch.equal(view, image) or torch.equal(view, image.flip(-1))
    cropped = augment(images, make_generator(0, "cpu"), "crop")
    whole = (cropped == 1).all(1).flatten(1).sum(1) >= 9
    assert 0.25 < float((~whole).float().mean()) < 0.75


def test_augment_kinds(cifar_arrays, cifar_classes):
    images = Bank.from_arrays(*cifar_arrays, cifar_classes).images[:8]
    assert torch.equal(augment(images, make_generator(0, "cpu"), "none"), images.float() / 255)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment(images, make_generator(0, "cpu"), "rotate")


@pytest.mark.parametrize("height, width", [(8, 64), (64, 8), (8, 8), (9, 40)])
def test_the_crop_pads_by_the_shorter_side(height, width):
    """Reflect padding must be shorter than the side it pads: 1/8 of the width crashed an 8x64 image."""
    images = torch.randint(0, 256, (4, 3, height, width), dtype=torch.uint8)
    out = augment(images, make_generator(0, "cpu"), "crop")
    assert out.shape == (4, 3, height, width)


def test_augment_is_seeded_and_in_unit_range(cifar_arrays, cifar_classes):
    bank = Bank.from_arrays(*cifar_arrays, cifar_classes)
    first = augment(bank.images[:32], make_generator(3, "cpu"))
    again = augment(bank.images[:32], make_generator(3, "cpu"))
    assert torch.equal(first, again)
    assert first.dtype == torch.float32 and 0 <= first.min() and first.max() <= 1


def test_hue_shift_is_torchvisions_per_sample():
    """SimCLR's hue jitter (issue: torchvision's ColorJitter, drawn per sample): the same HSV shift as
    torchvision's adjust_hue, grey and black pixels and pure primaries included."""
    import torchvision.transforms.functional as TF

    from sanitize.data import shift_hue

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 9, 7, generator=generator)
    images[0] = 0.5
    images[1, :, :2] = 0
    images[2] = images[2].round()
    turns = torch.rand(16, generator=generator) - 0.5
    expected = torch.stack([TF.adjust_hue(image, float(turn)) for image, turn in zip(images, turns)])
    assert torch.allclose(shift_hue(images, turns), expected, atol=1e-5)


@pytest.mark.parametrize("sync_free", [False, True])  # the CPU's way and the GPU's
def test_color_jitter_is_torchvisions_color_jitter_with_its_order_drawn_per_sample(cifar_arrays, sync_free):
    """Each sample gets torchvision's four adjustments, with its own factors, in its own order, or none.
    The reference draws the same random numbers in the order color_jitter draws them and adjusts one
    image at a time with torchvision, so a sample adjusted in another sample's order, or twice, fails."""
    import torchvision.transforms.functional as TF

    from sanitize.data import color_jitter

    images = torch.from_numpy(cifar_arrays[0][:48]).permute(0, 3, 1, 2).float() / 255
    images[0] = 0.5  # grey: no hue, no saturation
    before = images.clone()
    out = color_jitter(images, make_generator(4, "cpu"), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                       p=0.8, sync_free=sync_free)
    assert torch.equal(images, before)  # the input is not changed

    generator = make_generator(4, "cpu")
    factors = [torch.rand(48, generator=generator) * 0.8 + 0.6 for _ in range(3)]
    turns = torch.rand(48, generator=generator) * 0.2 - 0.1
    jitter = torch.rand(48, generator=generator) < 0.8
    order = torch.rand(48, 4, generator=generator).argsort(1)
    adjust = (lambda x, i: TF.adjust_brightness(x, float(factors[0][i])),
              lambda x, i: TF.adjust_contrast(x, float(factors[1][i])),
              lambda x, i: TF.adjust_saturation(x, float(factors[2][i])),
              lambda x, i: TF.adjust_hue(x, float(turns[i])))
    expected = []
    for i, image in enumerate(images):
        for index in order[i].tolist() if jitter[i] else []:
            image = adjust[index](image, i)
        expected.append(image)
    assert 0 < jitter.sum() < 48 and len({tuple(row) for row in order.tolist()}) > 10
    # torchvision weighs red 0.2989 in its grayscale, we 0.299 as its docs and PIL do: 5e-5 apart at most
    assert torch.allclose(out, torch.stack(expected), atol=1e-4)


def test_color_jitter_gives_the_same_bits_with_or_without_picking_samples():
    """The GPU's sync-free way and the CPU's way are one function of the same draws."""
    from sanitize.data import color_jitter

    images = torch.rand(64, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    images[:4] = images[:4].round()  # pure primaries, black and white: hue's edge cases
    for seed in range(3):
        picked, fused = (color_jitter(images, make_generator(seed, "cpu"), p=0.6, sync_free=way)
                         for way in (False, True))
        assert torch.equal(picked, fused) and not torch.equal(picked, images)


def test_brightness_jitter_scales_each_sample_by_its_own_factor():
    from sanitize.data import color_jitter

    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).mul(0.7).repeat(32, 1, 1, 1)
    out = color_jitter(images, make_generator(0, "cpu"), brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0)
    factors = (out / images).flatten(1)  # no pixel reaches 1 here: 0.7 * 1.4 < 1
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), atol=1e-5)  # one factor per sample
    assert factors[:, 0].min() >= 0.6 - 1e-6 and factors[:, 0].max() <= 1.4 + 1e-6
    assert len(factors[:, 0].unique()) == 32
