"""The only place images are decoded, checked, converted to RGB and resized.

Every stage (build-dataset, extract, predict, serve) goes through :func:`load_image`, so a model
never sees images prepared differently from how it was trained. The recipe is named by
:data:`DECODER` and stored with every feature file and bundle; prediction refuses a bundle made with
another recipe.

Recipe: read the file by content (the extension may lie), refuse images above ``max_pixels``
(decompression bombs), apply the EXIF orientation, take the first frame of an animation, scale
16-bit samples to 8 bits, composite transparency onto white, convert to 3-channel RGB and resize
to the backbone's square input: area averaging (box) when shrinking, bilinear when enlarging. JPEGs are decoded at a
reduced DCT scale when that still leaves at least the target size (Pillow's ``draft``), which is
several times faster and part of the recipe.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

#: Name and version of the decoding recipe; stored in feature files and bundles.
#: Decompression-bomb limit (pixels): Pillow's own threshold, the default of ``max_image_pixels``.
MAX_PIXELS = 89_478_485

DECODER = "pillow-rgb-white-alpha-box-or-bilinear-v2"

#: File name extensions the stages pick up when they scan a folder (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
#: Samples per strip when 16-bit and 32-bit gray images are scaled to 8 bits (8 MiB as float64).
_STRIP_SAMPLES = 1 << 20


def is_image_name(path: str | Path) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (the content is checked later)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    """Open lazily and check the pixel count before anything is decoded."""
    try:
        with warnings.catch_warnings():
            # We apply our own, configurable limit below; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: the image has too many pixels") from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        if size == 0:
            raise ImageError("empty file (0 bytes)") from None
        raise ImageError("not an image (unrecognised file content)") from None
    except PermissionError:
        raise ImageError("unreadable file: permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as exc:  # from the system (with an errno), or from Pillow parsing a broken header
        raise ImageError(f"{'unreadable file' if exc.errno else 'corrupt image'}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"decompression bomb: {width}x{height} = {width * height} pixels is above the limit "
            f"of {max_pixels} (setting max_image_pixels)"
        )
    return image


def _size_or_none(source) -> int | None:
    if hasattr(source, "getbuffer"):  # an in-memory upload
        return source.getbuffer().nbytes
    try:
        return os.path.getsize(source)
    except (OSError, TypeError):
        return None


def _scale_to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer gray image scaled to 8 bits (``L``): 65535 (or 255 for 32-bit samples that
    all fit in 8 bits) becomes 255, rounded to the nearest.

    Converted in strips of rows of :data:`_STRIP_SAMPLES` samples, so the float64 arithmetic never holds
    more than a strip: a whole 6000 x 6000 image as float64 would be 275 MiB, and its temporaries thrice that.
    """
    width, height = image.size
    # 16-bit modes span 0-65535; 32-bit samples are read as 16-bit unless they all fit in 8 bits.
    maximum = 65535.0 if image.mode != "I" or width * height and image.getextrema()[1] > 255 else 255.0
    scaled = Image.new("L", image.size)
    rows = max(1, _STRIP_SAMPLES // max(1, width))
    for top in range(0, height, rows):
        strip = np.asarray(image.crop((0, top, width, min(height, top + rows))), dtype=np.float64)
        strip = np.clip(strip * (255.0 / maximum) + 0.5, 0, 255).astype(np.uint8)
        scaled.paste(Image.fromarray(strip, "L"), (0, top))
    return scaled


def _to_rgb(image: Image.Image, keep_gray: bool = False) -> Image.Image:
    """Convert any Pillow mode to 3-channel RGB, the same way for every stage.

    With ``keep_gray`` a gray image (``L``, or 16-bit scaled to it) is returned as ``L``: resized before it
    becomes RGB, it gives the same pixels without a full-size RGB copy (4 bytes a pixel in Pillow).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _scale_to_eight_bits(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if keep_gray and image.mode == "L" else image.convert("RGB")


def _resampling(source: tuple[int, int], target: tuple[int, int]) -> Image.Resampling:
    """Area averaging (box) to shrink, bilinear to enlarge: each the standard filter for its direction.

    Box is also a third cheaper than bilinear when shrinking, which matters on a CPU where the
    decoder competes with the model for cores.
    """
    shrinking = source[0] >= target[0] and source[1] >= target[1]
    return Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR


def load_image(path, size: int | tuple[int, int], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into a ``(height, width, 3)`` uint8 RGB array of the target ``size``.

    Parameters
    ----------
    path : str, Path or binary file object
        The image file (or an upload held in memory). Its name is ignored; the content decides
        the format.
    size : int or (width, height)
        Target size; an int means a square.
    max_pixels : int
        Images with more pixels than this are refused as decompression bombs.

    Raises
    ------
    ImageError
        With the reason, when the file cannot be decoded into an image.
    """
    width, height = (size, size) if isinstance(size, int) else size
    image = _open(path, max_pixels)
    try:
        with image:
            if image.format == "JPEG":
                image.draft("RGB", (width, height))
            image.seek(0)  # first frame of an animation
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
            image = _to_rgb(image, keep_gray=True)
            image = image.resize((width, height), _resampling(image.size, (width, height)))
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated and corrupt data as OSError (or SyntaxError for some formats).
        reason = str(exc) or type(exc).__name__
        raise ImageError(f"corrupt image: {reason}") from None


def resize_pixels(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """An RGB uint8 array ``(height, width, 3)`` resized as :func:`load_image` resizes a decoded file.

    For images already in memory (a camera frame, a dataset loaded as arrays): the same filters,
    so their features match those of the same pixels read from a lossless file.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if pixels.shape[:2] == (height, width):
        return pixels
    image = Image.fromarray(pixels, "RGB")
    return np.asarray(image.resize((width, height), _resampling(image.size, (width, height))), dtype=np.uint8)


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Check that ``path`` decodes and return its displayed ``(width, height)``.

    The whole image is decoded (at a reduced JPEG scale), so truncated data is caught; the size
    is the one after the EXIF orientation is applied. Raises :class:`ImageError` like
    :func:`load_image`.
    """
    image = _open(path, max_pixels)
    try:
        with image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"corrupt image: {str(exc) or type(exc).__name__}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (dataset manifests and duplicate checks use it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
