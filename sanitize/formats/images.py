"""The one place that opens images: bytes -> RGB uint8 arrays at the working size.

Hostile bytes are expected. ``open_image`` only lets through the formats a
classification set uses (so a ``.jpg`` that is really EPS never reaches
Ghostscript), refuses decompression bombs before any pixel is decoded, and
every failure of Pillow on bad data becomes a reason string, never a crash.

Working-size rule (``working_size``): an explicit ``image_size`` wins (an int
means square); otherwise, if at least half of the readable images share one
size whose longer side is <= 64 pixels, that size is kept and the others are
resized to it (scaled up, aspect kept, if its shorter side is under 8 pixels: the
smallest the models take); otherwise every image is resized so that its shorter
side is 224 and center-cropped to 224x224. Resizing always covers the target and
center-crops, so the aspect ratio is never distorted. A requested size must be
8 to 4096 pixels a side.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageOps

from sanitize.formats.records import InputError
from sanitize.formats.workers import Workers

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"})
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM")  # JPEG also opens MPO (camera) files
# 40 megapixels is a 6300x6300 photo; anything larger in a classification set is an attack.
MAX_PIXELS = 40_000_000
SMALL_SIDE = 64
MIN_SIDE = 8  # the small CNN pools a 32 px input down three times
DEFAULT_SIDE = 224
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, the usual viewer convention
POOL_MIN_SAMPLES = 2000  # below this, starting worker processes costs more than it saves
CHUNK = 256
# What Pillow raises on bad bytes (fuzzing finds all of these); anything else is our bug and propagates.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
                Image.DecompressionBombError, Image.DecompressionBombWarning)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATION = 0x0112
NON_FINITE = "image has NaN or infinite pixel values"
_OBJECT_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # Pillow names the BytesIO; reasons must be reproducible


def _quiet_libtiff() -> None:
    """libtiff prints its errors and warnings to stderr from C, past Python: "tempfile.tif: Using code not yet
    in table." for each damaged LZW TIFF, in the middle of the progress lines. Such a sample is reported
    unreadable with Pillow's reason all the same, so the handlers of the libtiff Pillow has loaded are
    cleared, once per process (workers import this module too). Where that library cannot be found (no
    /proc, a Pillow without libtiff), nothing changes."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            mapped = [line.split(maxsplit=5) for line in maps]  # address, perms, offset, dev, inode, path
        paths = {fields[5].strip() for fields in mapped if len(fields) == 6 and "libtiff" in fields[5]}
        for path in paths:
            library = ctypes.CDLL(path)  # the loaded copy: dlopen of a loaded path returns its handle
            for setter in (library.TIFFSetErrorHandler, library.TIFFSetWarningHandler):
                setter.restype, setter.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                setter(None)
    except (OSError, AttributeError):
        pass


_quiet_libtiff()


class BadPixels(ValueError):
    """Pixels that decode but mean nothing (NaN, infinity); the message is the whole reason."""


def open_image(data: bytes) -> Image.Image:
    """Open (header only) and refuse bombs; call inside ``bomb_guard``. Raises one of IMAGE_ERRORS."""
    image = Image.open(io.BytesIO(data), formats=FORMATS)
    if image.width * image.height > MAX_PIXELS:
        raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels exceeds the {MAX_PIXELS} cap")
    return image


@contextlib.contextmanager
def bomb_guard():
    """Pillow only *warns* about images a little over its own limit; make that an error too.

    Its other warnings (corrupt EXIF, odd TIFF tags) concern images that still decode: they
    would reach the terminal once per file from every worker, so they are dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) as shown, i.e. after the EXIF orientation is applied; nothing is decoded."""
    width, height = image.size
    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # the transposing orientations
        width, height = height, width
    return height, width


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB: alpha composited on BACKGROUND, 16-bit and float scaled (not clipped) to 8-bit."""
    if image.mode in _WIDE_MODES:
        return Image.fromarray(wide_to_uint8(np.asarray(image)), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit and float grey levels -> uint8, by scaling, never by clipping.

    Integers within [0, 65535] are 16-bit (Pillow opens many 16-bit files as
    32-bit "I"): x * 255 / 65535. Floats within [0, 1] are scaled by 255.
    Anything else is stretched from its own min..max, in float64 (float32 extremes
    would overflow). NaN or infinity raises BadPixels: there is no image to scale.
    """
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise BadPixels(NON_FINITE)
    low, high = float(values.min()), float(values.max())
    if values.dtype.kind == "f" and 0 <= low and high <= 1:
        scaled = values * 255.0
    elif values.dtype.kind in "iu" and 0 <= low and high <= 65535:
        scaled = values * (255 / 65535)
    else:
        scaled = (values.astype(np.float64) - low) * (255 / max(high - low, 1e-12))
    return np.rint(scaled).astype(np.uint8)


def resize_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers (H, W), then center-crop to it, in one resampling step."""
    height, width = size
    if (image.height, image.width) == size:
        return image
    scale = max(width / image.width, height / image.height)
    # width / (width / 49) is 49.00000000000001: a crop an ulp wider than the image, a left edge at -4e-15,
    # and Pillow's "box offset can't be negative" made 6% of side lengths unreadable
    crop_w, crop_h = min(image.width, width / scale), min(image.height, height / scale)
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


def decode(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Bytes -> uint8 [H, W, 3] RGB, EXIF-rotated, resized to ``size`` (H, W) if given. Raises IMAGE_ERRORS."""
    with bomb_guard():
        return _pixels(open_image(data), size)


def _pixels(image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    if size is not None:
        image.draft(None, (max(size), max(size)))  # JPEG: decode at 1/2..1/8 scale when that still covers size
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    image = to_rgb(image)
    if size is not None:
        image = resize_cover(image, size)
    return np.asarray(image, dtype=np.uint8)


def probe(data: bytes) -> np.ndarray | tuple[int, int]:
    """Small images (longer side <= SMALL_SIDE) decoded at their own size; larger ones only measured (H, W)."""
    with bomb_guard():
        image = open_image(data)
        shown = oriented_size(image)
        return _pixels(image, None) if max(shown) <= SMALL_SIDE else shown


def _each(function, datas: list[bytes]) -> list:
    """Apply ``function`` to each item; a failure on bad bytes becomes its reason string."""
    results = []
    for data in datas:
        try:
            results.append(function(data))
        except BadPixels as error:
            results.append(str(error))
        except (*IMAGE_ERRORS, TypeError) as error:
            if isinstance(error, TypeError) and not raised_in_pillow(error):
                raise
            results.append(f"cannot decode image: {type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}")
    return results


_PILLOW = os.path.dirname(Image.__file__) + os.sep


def raised_in_pillow(error: BaseException) -> bool:
    """Whether the innermost Python frame of ``error``'s traceback is Pillow's. Pillow raises TypeError
    on some hostile files (a TIFF whose StripOffsets tag is a float: ``seek(1.5)`` in ImageFile.load);
    a TypeError of ours must still propagate."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and trace.tb_frame.f_code.co_filename.startswith(_PILLOW)


def _each_packed(function, datas: list[bytes]) -> list | np.ndarray:
    """``_each``, with a chunk of same-shape arrays stacked into one: the parent unpickles one array, not
    256 (on a 2-core machine 0.17 s of the parent's serial time per 50,000 CIFAR images, against 0.003)."""
    results = _each(function, datas)
    first = results[0] if results else None
    if isinstance(first, np.ndarray) and all(isinstance(r, np.ndarray) and r.shape == first.shape for r in results):
        return np.stack(results)
    return results


def map_chunks(function, datas: list[bytes], workers: Workers) -> Iterator:
    """Yield ``_each(function)`` results in input order (see ``map_parts``; a stacked part yields views of its
    rows)."""
    for part in map_parts(function, datas, workers):
        yield from part


def map_parts(function, datas: list[bytes], workers: Workers) -> Iterator[list | np.ndarray]:
    """``_each(function)`` over ``datas`` in input order, a part at a time: inline for small inputs (one
    list), else chunked over the pool (each chunk a list, or one stacked array, see ``_each_packed``)."""
    if len(datas) < POOL_MIN_SAMPLES:
        yield _each(function, datas)
        return
    chunks = [datas[start:start + CHUNK] for start in range(0, len(datas), CHUNK)]
    yield from workers.map(partial(_each_packed, function), chunks)


@dataclass
class Decoded:
    """``images`` uint8 [M, H, W, 3] for the inputs not in ``errors``, in input order; ``errors`` maps
    index -> reason."""

    images: np.ndarray
    errors: dict[int, str]
    image_size: tuple[int, int]
    size_rule: str


def decode_images(datas: list[bytes], workers: Workers, *, image_size=None) -> Decoded:
    """Decode every input at one working size (see the module docstring for the rule).

    Without ``image_size`` a first pass measures every image and already keeps
    the small ones decoded, so a CIFAR-like set is decoded once.
    """
    if image_size is not None:
        size, rule = working_size([], image_size)
        images, errors, todo = allocate(len(datas), size), {}, list(range(len(datas)))
    else:
        images, size, rule, errors, todo = _probe_all(datas, workers)
    for index, result in zip(todo, map_chunks(partial(decode, size=size), [datas[i] for i in todo], workers)):
        if isinstance(result, str):
            errors[index] = result
        else:
            images[index] = result
    if errors:  # the readable rows moved up in place: a second array would double the peak memory
        kept = [index for index in range(len(datas)) if index not in errors]
        for row, index in enumerate(kept):
            if row != index:
                images[row] = images[index]
        images = images[:len(kept)]
    return Decoded(images, errors, size, rule)


def allocate(count: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [count, H, W, 3] for the decoded images; an InputError (one line, not a traceback) when this
    machine's memory cannot hold them."""
    try:
        return np.empty((count, *size, 3), dtype=np.uint8)
    except MemoryError:
        raise InputError(f"out of memory: {count} images at {size[0]}x{size[1]} need "
                         f"{count * size[0] * size[1] * 3 / 2**30:.1f} GiB; try a smaller --image-size") from None


def _probe_all(datas: list[bytes], workers: Workers):
    """The first pass: (images, size, rule, errors, todo), ``images`` holding every image the probe decoded
    at the working size, ``todo`` the indices still to decode at it.

    A stacked part is copied into ``images`` as it arrives, at the size of the first stacked part (the
    guess), and not kept: holding every probed image until the working size is known doubled the peak
    memory of a small-image set. Where the working size turns out another (rare: most images of another
    size than the first chunk's, or one scaled up), those rows are decoded again from their bytes.
    """
    images, guess, copied, kept, sizes, errors = None, None, [], [], [], {}
    start = 0
    for part in map_parts(probe, datas, workers):
        if isinstance(part, np.ndarray):
            sizes += [part.shape[1:3]] * len(part)
            if guess is None:
                guess = part.shape[1:3]
                images = allocate(len(datas), guess)
            if part.shape[1:3] == guess:
                images[start:start + len(part)] = part
                copied.append(range(start, start + len(part)))
            else:
                kept.append((start, part))
        else:
            for index, result in enumerate(part, start):
                if isinstance(result, str):
                    errors[index] = result
                else:
                    sizes.append(_size_of(result))
            kept.append((start, part))
        start += len(part)
    size, rule = working_size(sizes)
    todo = []
    if size != guess:
        images = allocate(len(datas), size)
        todo = [index for indices in copied for index in indices]
    for start, part in kept:
        for index, result in enumerate(part, start):
            if isinstance(result, np.ndarray) and result.shape[:2] == size:
                images[index] = result
            elif index not in errors:
                todo.append(index)
    return images, size, rule, errors, sorted(todo)


def _size_of(result) -> tuple[int, int]:
    return tuple(result.shape[:2]) if isinstance(result, np.ndarray) else result


def working_size(sizes: list[tuple[int, int]], requested=None) -> tuple[tuple[int, int], str]:
    """The (H, W) every image is brought to, and a one-line account of why."""
    if requested is not None:
        size = (requested, requested) if isinstance(requested, int) else tuple(int(side) for side in requested)
        return size, f"{size[0]}x{size[1]} (HxW) as requested; other sizes resized to cover it and center-cropped"
    if not sizes:
        return (DEFAULT_SIDE, DEFAULT_SIDE), "no readable image; default 224x224"
    common, count = Counter(sizes).most_common(1)[0]
    described = f"most common size {common[0]}x{common[1]} (HxW) in {count} of {len(sizes)} images"
    if 2 * count >= len(sizes) and max(common) <= SMALL_SIDE:
        if min(common) < MIN_SIDE:
            scale = MIN_SIDE / min(common)
            size = tuple(max(MIN_SIDE, round(side * scale)) for side in common)
            return size, (f"the {described} scaled up to {size[0]}x{size[1]}, the smallest the models take "
                          f"({MIN_SIDE} px a side); others resized to cover it and center-cropped")
        return common, f"kept the {described}; {len(sizes) - count} others resized to cover it and center-cropped"
    return (DEFAULT_SIDE, DEFAULT_SIDE), (
        f"{described} is not a small (longer side <= {SMALL_SIDE}) majority: "
        f"shorter side resized to {DEFAULT_SIDE}, center crop {DEFAULT_SIDE}x{DEFAULT_SIDE}")
