"""images.py: odd but valid images decode correctly; hostile bytes become reasons, never crashes."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from sanitize.formats.images import (DEFAULT_SIDE, IMAGE_ERRORS, MAX_PIXELS, _each, _each_packed, decode,
                                     decode_images, probe, resize_cover, wide_to_uint8, working_size)
from sanitize.formats.records import InputError
from sanitize.formats.workers import Workers


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """A uint8 [H, W, 3] image that tells every row, column and channel apart."""
    rows = np.linspace(0, 255, height)[:, None]
    cols = np.linspace(0, 255, width)[None, :]
    return np.stack([rows + 0 * cols, 0 * rows + cols, 255 - (rows + cols) / 2], axis=-1).round().astype(np.uint8)


def test_rgb_png_is_lossless():
    pixels = gradient()
    assert np.array_equal(decode(encode(Image.fromarray(pixels), "PNG")), pixels)


def test_grayscale_becomes_three_equal_channels():
    grey = gradient()[..., 0]
    decoded = decode(encode(Image.fromarray(grey, "L"), "PNG"))
    assert decoded.shape == (24, 32, 3)
    assert all(np.array_equal(decoded[..., channel], grey) for channel in range(3))


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    image.putpixel((0, 0), 1)
    decoded = decode(encode(image, "PNG", transparency=0))
    assert decoded[0, 0].tolist() == [0, 0, 255]
    assert decoded[1, 1].tolist() == [255, 255, 255]  # the transparent red is not shown


def test_rgba_half_transparent_is_blended():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    value = decode(encode(image, "PNG"))[0, 0]
    assert np.all(np.abs(value.astype(int) - 127) <= 1)


def test_la_is_composited():
    image = Image.new("LA", (2, 2), (0, 0))
    assert decode(encode(image, "PNG"))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = decode(encode(image, "JPEG", quality=95))[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    decoded = decode(encode(Image.fromarray(values), "PNG"))[..., 0]
    assert decoded.tolist() == [[0, 4, 128, 255]]


def test_netpbm_as_torchvision_reads_it():
    """.ppm and .pgm are in torchvision's ImageFolder extensions; a 16-bit PGM is scaled like a 16-bit PNG."""
    pixels = gradient()
    assert np.array_equal(decode(encode(Image.fromarray(pixels), "PPM")), pixels)
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    assert decode(encode(Image.fromarray(values), "PPM"))[..., 0].tolist() == [[0, 4, 128, 255]]
    assert decode(encode(Image.fromarray(pixels[..., 0]), "PPM"))[..., 2].tolist() == pixels[..., 0].tolist()


def test_float_tiff_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    decoded = decode(encode(Image.fromarray(values, "F"), "TIFF"))[..., 0]
    assert decoded.tolist() == [[0, 128, 255]]


def float_tiff(values) -> bytes:
    return encode(Image.fromarray(np.asarray(values, dtype=np.float32), "F"), "TIFF")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("whole", [True, False], ids=["all", "one-pixel"])
def test_float_tiff_with_non_finite_pixels_is_unreadable_without_warnings(bad, whole):
    values = np.full((16, 16), bad if whole else 0.5)
    values[3, 4] = bad
    good = float_tiff(np.full((16, 16), 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarnings reached stderr even under -q
        decoded = decode_images([float_tiff(values), good], Workers(1))
        sized = decode_images([float_tiff(values), good], Workers(1), image_size=8)
    assert decoded.errors == sized.errors == {0: "image has NaN or infinite pixel values"}
    assert decoded.images.shape == (1, 16, 16, 3) and decoded.images.max() == 64


def test_float_tiff_at_the_float32_extremes_is_stretched_without_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode(float_tiff([[-3e38, 0.0, 3e38]]))[..., 0]
    assert decoded.tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_rotation_is_applied(fmt):
    pixels = gradient(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(pixels), fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    decoded = decode(data)
    assert decoded.shape == (40, 20, 3)
    assert np.abs(decoded.astype(int) - np.rot90(pixels, k=-1)).mean() < 3
    assert probe(data).shape == (40, 20, 3)
    assert decode(encode(Image.new("RGB", (300, 100)), fmt, exif=exif)).shape == (300, 100, 3)


def test_wide_values_are_scaled_by_their_kind():
    assert wide_to_uint8(np.array([[0, 65535]], dtype=np.int32)).tolist() == [[0, 255]]  # "I" holding 16-bit
    assert wide_to_uint8(np.array([[-10, 0, 10]], dtype=np.int32)).tolist() == [[0, 128, 255]]  # stretched
    assert wide_to_uint8(np.array([[0.0, 2.0, 4.0]], dtype=np.float32)).tolist() == [[0, 128, 255]]
    assert wide_to_uint8(np.array([[7, 7]], dtype=np.uint16)).tolist() == [[0, 0]]


def test_webp_lossless():
    pixels = gradient()
    assert np.array_equal(decode(encode(Image.fromarray(pixels), "WEBP", lossless=True)), pixels)


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "JPEG"])
def test_other_formats_decode(fmt):
    assert decode(encode(Image.fromarray(gradient()), fmt)).shape == (24, 32, 3)


def test_large_jpeg_is_resized_to_cover_and_center_cropped():
    pixels = np.zeros((1500, 3000, 3), dtype=np.uint8)
    pixels[:, 1000:2000] = 255  # a white square in the middle third
    decoded = decode(encode(Image.fromarray(pixels), "JPEG", quality=90), (224, 224))
    assert decoded.shape == (224, 224, 3)
    assert decoded[112, 112].min() > 240  # the center survives the crop...
    assert decoded[112, 2].max() < 15 and decoded[112, 221].max() < 15  # ...with black on both sides


def test_probe_measures_large_images_without_decoding():
    data = encode(Image.new("RGB", (300, 100)), "PNG")
    assert probe(data) == (100, 300)


@pytest.mark.parametrize("bad", [
    b"",
    b"not an image at all",
    encode(Image.new("RGB", (64, 64), "red"), "PNG")[:120],  # truncated
    encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:-300],  # truncated
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS would run Ghostscript
], ids=["zero-bytes", "text", "truncated-png", "truncated-jpeg", "eps"])
def test_bad_bytes_become_reasons(bad):
    [reason] = _each(decode, [bad])
    assert isinstance(reason, str) and reason.startswith("cannot decode image")


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


@pytest.mark.parametrize("pixels", [MAX_PIXELS + 1, 200_000 * 200_000])
def test_decompression_bomb_is_refused_before_decoding(pixels):
    side = int(pixels ** 0.5) + 1
    with pytest.raises(Image.DecompressionBombError):
        decode(bomb_png(side, side))
    [reason] = _each(probe, [bomb_png(side, side)])
    assert "DecompressionBomb" in reason


def test_image_errors_do_not_swallow_our_bugs():
    assert not issubclass(TypeError, IMAGE_ERRORS) and not issubclass(AttributeError, IMAGE_ERRORS)

    def buggy(data):
        return len(data) + "1"  # a TypeError of ours

    with pytest.raises(TypeError):
        _each(buggy, [b"x"])


def tiff_with_float_strip_offsets() -> bytes:
    """A TIFF whose StripOffsets tag (273) is stored as a float: it opens, then Pillow's load seeks to
    a float and raises TypeError (found by the hostile-input audit; it crashed a whole run)."""
    data = bytearray(encode(Image.new("RGB", (32, 32)), "TIFF"))
    directory = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, directory)[0]):
        offset = directory + 2 + 12 * entry
        if struct.unpack_from("<H", data, offset)[0] == 273:
            struct.pack_into("<H", data, offset + 2, 11)  # type 11: FLOAT
    return bytes(data)


def test_pillows_type_error_on_a_hostile_tiff_becomes_a_reason():
    for function in (decode, probe):
        [reason] = _each(function, [tiff_with_float_strip_offsets()])
        assert reason.startswith("cannot decode image: TypeError")


def test_working_size_rule():
    assert working_size([(32, 32)] * 3 + [(40, 40)])[0] == (32, 32)
    # below the models' smallest input (8 px a side) a common size is scaled up, aspect kept
    assert working_size([(5, 5)] * 3)[0] == (8, 8)
    size, rule = working_size([(4, 16)] * 3)
    assert size == (8, 32) and "scaled up to 8x32" in rule
    assert working_size([(32, 32)] * 3, 48)[0] == (48, 48)
    assert working_size([(32, 32)] * 3, (40, 50))[0] == (40, 50)
    assert working_size([(32, 32), (100, 80), (90, 90)])[0] == (DEFAULT_SIDE, DEFAULT_SIDE)
    assert working_size([(128, 128)] * 5)[0] == (DEFAULT_SIDE, DEFAULT_SIDE)
    size, rule = working_size([(28, 28)] * 2 + [(32, 32)] * 2)
    assert size in {(28, 28), (32, 32)} and "2 of 4" in rule


def test_decode_images_keeps_order_and_reports_failures():
    good = [encode(Image.fromarray(gradient(32, 32) // (i + 1)), "PNG") for i in range(3)]
    odd = encode(Image.fromarray(gradient(40, 60)), "PNG")
    with Workers(1) as workers:
        decoded = decode_images([good[0], b"junk", good[1], odd, good[2]], workers)
    assert decoded.image_size == (32, 32)
    assert sorted(decoded.errors) == [1]
    assert decoded.images.shape == (4, 32, 32, 3)
    assert np.array_equal(decoded.images[1], gradient(32, 32) // 2)
    assert decoded.images[2].shape == (32, 32, 3)  # the 40x60 one, resized to the common size


def test_a_chunk_of_same_size_images_travels_stacked_and_any_other_as_it_is():
    small = [encode(Image.fromarray(gradient(32, 32) // (i + 1)), "PNG") for i in range(3)]
    packed = _each_packed(probe, small)
    assert isinstance(packed, np.ndarray) and packed.shape == (3, 32, 32, 3)
    assert all(np.array_equal(row, one) for row, one in zip(packed, _each(probe, small)))
    large = encode(Image.fromarray(gradient(100, 80)), "PNG")  # probed as its size, not decoded
    for mixed in ([*small, b"junk"], [*small, large], [*small, encode(Image.fromarray(gradient(40, 60)), "PNG")]):
        assert isinstance(_each_packed(probe, mixed), list) and len(_each_packed(probe, mixed)) == 4
    assert _each_packed(probe, []) == []


def _mixed_sizes(count: int, first: tuple[int, int], most: tuple[int, int], every: int = 3) -> list[bytes]:
    """PNGs: the first 40 of size ``first``, then ``most`` but every ``every``-th of ``first``, a few broken."""
    datas = []
    for index in range(count):
        if index % 97 == 50:
            datas.append(b"junk")
            continue
        height, width = first if index < 40 or index % every == 0 else most
        datas.append(encode(Image.fromarray(gradient(height, width) // (1 + index % 5)), "PNG"))
    return datas


@pytest.mark.parametrize("first, most", [((24, 32), (24, 32)), ((24, 32), (20, 20)), ((6, 6), (6, 6))])
def test_pooled_decoding_equals_inline_whatever_size_the_first_chunk_guesses(first, most, monkeypatch):
    """The probe copies stacked chunks at the first chunk's size as they arrive; where most images have
    another size (or the common size is scaled up), those rows are decoded again at the working size."""
    import sanitize.formats.images as images_module

    datas = _mixed_sizes(300, first, most)
    with Workers(1) as workers:
        inline = decode_images(datas, workers)
    monkeypatch.setattr(images_module, "POOL_MIN_SAMPLES", 10)
    monkeypatch.setattr(images_module, "CHUNK", 16)
    with Workers(2) as workers:
        pooled = decode_images(datas, workers)
    assert pooled.image_size == inline.image_size and pooled.size_rule == inline.size_rule
    assert pooled.errors == inline.errors and len(pooled.errors) == 3
    assert np.array_equal(pooled.images, inline.images) and len(pooled.images) == 297
    if first != most:
        assert inline.image_size == most  # the first chunk's guess was wrong
    assert decode_images(datas, Workers(1), image_size=12).images.shape == (297, 12, 12, 3)


def test_the_probe_does_not_hold_a_second_copy_of_the_images(monkeypatch):
    import tracemalloc

    import sanitize.formats.images as images_module

    datas = [encode(Image.fromarray(gradient(32, 32) // (1 + i % 7)), "PNG") for i in range(3000)]
    monkeypatch.setattr(images_module, "POOL_MIN_SAMPLES", 10)
    monkeypatch.setattr(images_module, "CHUNK", 64)
    with Workers(2) as workers:
        decode_images(datas[:100], workers)  # the pool started outside the measurement
        tracemalloc.start()
        try:
            decoded = decode_images(datas, workers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert decoded.images.shape == (3000, 32, 32, 3)
    assert peak < 1.4 * decoded.images.nbytes  # holding every probed image too was 2x


@pytest.mark.filterwarnings("error")  # Pillow's warnings (corrupt EXIF in some of these) must not leak out
@pytest.mark.parametrize("fmt, params", [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}),
                                         ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("PPM", {})])
def test_randomly_damaged_images_decode_or_become_reasons(fmt, params):
    """A fuzz of the one image-open path: bytes flipped or cut, 60 times per format (12,000 once by hand:
    none raised). Each result is an image, a measured size (probe) or a reason, never an exception."""
    import random

    raw = encode(Image.fromarray(gradient(40, 40)), fmt, **params)
    rng = random.Random(0)
    outcomes = set()
    for index in range(60):
        data = bytearray(raw)
        if index % 3 == 0:
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        for function in (probe, decode):
            [result] = _each(function, [bytes(data)])
            if isinstance(result, str):
                outcomes.add("reason")
                assert result.startswith("cannot decode image")
            elif isinstance(result, tuple):  # probe measured a header that now claims a large image
                assert function is probe and len(result) == 2 and min(result) > 0
            else:
                outcomes.add("image")
                assert result.dtype == np.uint8 and result.shape[2] == 3
    assert "reason" in outcomes


def test_too_many_images_for_memory_is_one_line_error(monkeypatch):
    """numpy's MemoryError for the decoded array was a traceback (the audit, under ulimit -v, at
    --image-size 4096); the run's other out-of-memory errors were already one line."""
    def no_memory(shape, dtype):
        raise MemoryError(f"Unable to allocate array with shape {shape}")

    monkeypatch.setattr(np, "empty", no_memory)
    good = [encode(Image.fromarray(gradient(32, 32)), "PNG")] * 2
    with Workers(1) as workers, pytest.raises(InputError, match=r"out of memory: 2 images at 4096x4096 need "
                                                                  r"0\.1 GiB; try a smaller --image-size"):
        decode_images(good, workers, image_size=(4096, 4096))


def test_every_side_length_resizes_to_the_working_size():
    """32 / (32 / 49) is 49.00000000000001: the crop box came out an ulp wider than the image, its left edge
    negative, and Pillow refused it; 6% of side lengths (49, 98, 103 to 32 px; 55, 95, 97 to 224) were
    reported unreadable (the audit: 30 of 60 photos, 300x200 and 300x195, dropped)."""
    for target in (32, 224):
        for side in range(8, 400):
            image = Image.new("RGB", (side, side), "red")
            assert resize_cover(image, (target, target)).size == (target, target), side
    for width, height in ((300, 195), (300, 200), (7, 60), (60, 7)):
        assert resize_cover(Image.new("RGB", (width, height)), (224, 224)).size == (224, 224)


def test_damaged_lzw_tiffs_are_unreadable_without_libtiffs_lines_on_stderr(capfd):
    """libtiff prints "tempfile.tif: Using code not yet in table." from C for such files, into the progress
    lines; the reason goes into the manifest instead. 200 LZW TIFFs with three random bytes changed."""
    import random

    raw = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)), "TIFF",
                 compression="tiff_lzw")
    rng = random.Random(0)
    datas = []
    for _ in range(200):
        damaged = bytearray(raw)
        for _ in range(3):
            damaged[rng.randrange(8, len(raw) - 200)] = rng.randrange(256)
        datas.append(bytes(damaged))
    capfd.readouterr()
    decoded = decode_images(datas, Workers(1), image_size=32)
    assert len(decoded.errors) >= 50  # libtiff refused these, and said so before the fix
    assert capfd.readouterr().err == ""
