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

Nothing a file holds escapes as anything but :class:`~pyimagesearch_tl.errors.ImageError` with the
reason: whatever Pillow (or numpy on its output) raises while opening, seeking or decoding, for any
format, damaged or not, is turned into one at a single boundary. A path that is not a regular file
(a folder, FIFO, socket or device named like an image, a dangling link, a link loop) is refused
before it is opened, so reading never blocks. The stages skip such files and report the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import math
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError

#: Decompression-bomb limit (pixels): Pillow's own threshold, the default of ``max_image_pixels``.
MAX_PIXELS = 89_478_485

#: Name and version of the decoding recipe; stored in feature files and bundles.
DECODER = "pillow-rgb-white-alpha-box-or-bilinear-v2"

#: The formats Pillow may read a file as (told by content, whatever the name says). Each reads only its
#: header when opened, so the pixel count is checked before anything is decoded; ICO and CUR are left
#: out because Pillow decodes their embedded PNG inside ``Image.open`` (a 1x1 icon holding a 13000x13000
#: PNG would be decoded in full before any check).
FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP", "PPM", "TGA", "JPEG2000", "SGI", "PCX", "DDS", "QOI")

#: File name extensions the stages pick up when they scan a folder (case-insensitive).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
#: Samples per strip when 16-bit and 32-bit gray images are scaled to 8 bits (8 MiB as float64).
_STRIP_SAMPLES = 1 << 20


def _ignore_pillows_size_warning() -> None:
    """The decoder applies its own, configurable pixel limit (max_pixels), so Pillow's warning about large
    images is noise: ignored by one process-wide filter, put back when it is gone (an import inside a
    ``warnings.catch_warnings()`` block, as pytest's collection is, loses it at the block's end).

    Not ``catch_warnings()`` around each open: that swapped the process's warning state from the decoding
    threads, and a thread descheduled inside it (they run at the lowest priority) restored a stale state
    later, dropping the warning handler ptl's commands install (a part-file warning of ptl predict vanished).
    """
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_ignore_pillows_size_warning()


def is_image_name(path: str | Path) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (the content is checked later).

    Scans pick entries by this name alone, whatever their type: a folder, link or FIFO named like an
    image is then refused by the decoder with the reason, and reported, never dropped unseen.
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


#: What a path that is not a regular file is, by its type (opening a FIFO waits for a writer forever).
_NOT_REGULAR = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def check_regular_file(path: str | Path) -> None:
    """Refuse ``path`` unless it is a regular file (symbolic links followed), before anything opens it.

    Parameters
    ----------
    path : str or Path

    Raises
    ------
    ImageError
        With the reason: not found, a dangling symbolic link, a symbolic link loop, unreadable, or a
        folder, FIFO, socket or device.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(f"dangling symbolic link (to {os.readlink(path)}, which does not exist)") from None
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("unreadable file: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("symbolic link loop") from None
        raise ImageError(f"unreadable file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise ImageError(f"not a regular file: {_NOT_REGULAR.get(stat.S_IFMT(mode), 'a special file')}")


@contextlib.contextmanager
def _reasons(source) -> Iterator[None]:
    """Turn whatever Pillow (or numpy on its output) raises for ``source`` into an :class:`ImageError`.

    The one boundary between the decoder's libraries and the stages: a file of any format, however
    damaged, is an :class:`ImageError` with the reason. ``MemoryError`` propagates (the machine, not
    the file, is short), and so do ``KeyboardInterrupt`` and ``SystemExit`` (not ``Exception``).
    """
    try:
        yield
    except (ImageError, MemoryError):
        raise
    except Image.DecompressionBombError:
        raise ImageError("decompression bomb: the image has too many pixels") from None
    except UnidentifiedImageError:
        if _size_or_none(source) == 0:
            raise ImageError("empty file (0 bytes)") from None
        raise ImageError("not an image (unrecognised file content)") from None
    except PermissionError:
        raise ImageError("unreadable file: permission denied") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as exc:  # from the system (with an errno), or from Pillow on truncated or broken data
        if exc.errno:
            raise ImageError(f"unreadable file: {exc.strerror or exc}") from None
        raise ImageError(f"corrupt image: {str(exc) or type(exc).__name__}") from None
    except Exception as exc:  # ValueError, SyntaxError, NotImplementedError, struct.error, ... from a plugin
        raise ImageError(f"corrupt image: {str(exc) or type(exc).__name__}") from None


class _BoundedReader(io.BufferedReader):
    """An image file opened for decoding, whose reads never ask for more bytes than the file holds.

    A damaged header can give a box or chunk a length of exabytes, and Python allocates what a read
    asks for before reading: Pillow's ``fp.read(length)`` would raise ``MemoryError`` on a 3 KB file
    (a JPEG 2000 box, found by benchmarks/bench_fuzz.py). An upload held in memory needs no bound.
    """

    def __init__(self, path: str | Path):
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        return super().read(size if size is None or size < 0 else min(size, self._size))

    def read1(self, size: int = -1) -> bytes:
        return super().read1(size if size < 0 else min(size, self._size))


@contextlib.contextmanager
def _opened(source, max_pixels: int) -> Iterator[Image.Image]:
    """``source`` opened lazily, its pixel count checked before anything is decoded, closed after.

    A path is checked to be a regular file first and read through :class:`_BoundedReader`; a file
    object (an upload) is read as it is. Whatever the body raises goes through :func:`_reasons` too.
    """
    _ignore_pillows_size_warning()
    with _reasons(source), contextlib.ExitStack() as stack:
        if hasattr(source, "read"):
            handle = source
        else:
            check_regular_file(source)
            handle = stack.enter_context(_BoundedReader(source))
        image = stack.enter_context(Image.open(handle, formats=FORMATS))  # Pillow's size warning: ignored
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"decompression bomb: {width}x{height} = {width * height} pixels is above the limit "
                f"of {max_pixels} (setting max_image_pixels)"
            )
        yield image


#: Memory the decoder needs per pixel of an image, as a multiple of an RGB image's: a transparent or
#: palette image is composited onto white through full-size RGBA copies (measured: about 19 bytes per
#: pixel against 4 for RGB).
DECODE_WEIGHT = {"RGBA": 5, "LA": 5, "PA": 5, "P": 5, "RGBa": 5, "La": 5}


def declared_cost(source) -> tuple[tuple[int, int], int]:
    """The declared ``(width, height)`` of ``source`` and how many times an RGB image's memory per pixel
    decoding it takes (:data:`DECODE_WEIGHT`), read from its header alone."""
    with _opened(source, sys.maxsize) as image:
        return image.size, DECODE_WEIGHT.get(image.mode, 1)


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


#: How an image meets the model's square input: ``squash`` resizes the whole image to it (its aspect
#: ratio lost), ``crop`` resizes its centre square (``crop_pct`` of its shorter side) to it, as ImageNet
#: weights were evaluated, and ``letterbox`` fits the whole image inside it, aspect kept, on mid-gray.
RESIZE_MODES = ("squash", "crop", "letterbox")
#: The smallest share of the shorter side a centre crop keeps (ImageNet weights use 0.875 to 0.95).
MIN_CROP_PCT = 0.25
#: The letterbox margins: mid-gray, about zero after every backbone's preprocessing.
LETTERBOX_FILL = 128


@dataclasses.dataclass(frozen=True)
class Resize:
    """How an image is fitted to the model's input: part of every feature layout.

    Parameters
    ----------
    mode : {"squash", "crop", "letterbox"}
        See :data:`RESIZE_MODES`.
    crop_pct : float
        ``crop``: the share of the image's shorter side its centre square keeps (from
        :data:`MIN_CROP_PCT` to 1); 1.0 for the other modes.
    """

    mode: str = "squash"
    crop_pct: float = 1.0

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.mode!r}")
        pct = self.crop_pct
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not MIN_CROP_PCT <= pct <= 1:
            raise ConfigError(f"crop_pct must be a number from {MIN_CROP_PCT} to 1, got {repr(pct)[:40]}")
        if self.mode != "crop" and pct != 1:
            raise ConfigError(f"crop_pct applies to resize 'crop' only, got {pct!r} with {self.mode!r}")
        object.__setattr__(self, "crop_pct", float(pct))

    def describe(self) -> str:
        return f"centre crop {self.crop_pct:g}" if self.mode == "crop" else self.mode

    def scale(self, source: tuple[int, int], target: tuple[int, int]) -> float | None:
        """The factor the image is scaled by (None for ``squash``, which scales each axis apart)."""
        if self.mode == "squash":
            return None
        ratios = (target[0] / source[0], target[1] / source[1])
        return max(ratios) / self.crop_pct if self.mode == "crop" else min(ratios)

    def apply(self, image: Image.Image, target: tuple[int, int]) -> Image.Image:
        """``image`` fitted to ``target`` ``(width, height)`` (the filters of :func:`_resampling`)."""
        scale = self.scale(image.size, target)
        if scale is None:
            return image.resize(target, _resampling(image.size, target))
        width, height = image.size
        if self.mode == "crop":  # the centre region that scales to the target, in source pixels
            region = (target[0] / scale, target[1] / scale)
            box = ((width - region[0]) / 2, (height - region[1]) / 2, (width + region[0]) / 2, (height + region[1]) / 2)
            return image.resize(target, _resampling((round(region[0]), round(region[1])), target), box=box)
        fitted = (max(1, min(target[0], round(width * scale))), max(1, min(target[1], round(height * scale))))
        canvas = Image.new(image.mode, target, LETTERBOX_FILL if image.mode == "L" else (LETTERBOX_FILL,) * 3)
        canvas.paste(
            image.resize(fitted, _resampling(image.size, fitted)),
            ((target[0] - fitted[0]) // 2, (target[1] - fitted[1]) // 2),
        )
        return canvas

    def draft_size(self, source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """The size a JPEG may be decoded down to (Pillow's ``draft``) with every pixel used still at
        least at the target's scale."""
        scale = self.scale(source, target)
        if scale is None:
            return target
        return (math.ceil(source[0] * scale), math.ceil(source[1] * scale))


#: The recorded mode of every feature file written before resize modes existed.
SQUASH = Resize()
#: How a backbone fits images unless its record or a run says otherwise (benchmarks/accuracy.py --resizes).
DEFAULT_RESIZE = "squash"


def load_image(path, size: int | tuple[int, int], max_pixels: int = MAX_PIXELS, resize: Resize = SQUASH) -> np.ndarray:
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
    resize : Resize
        How the image is fitted to ``size`` (squashed, centre-cropped or letterboxed).

    Returns
    -------
    numpy.ndarray
        ``(height, width, 3)`` uint8 RGB pixels.

    Raises
    ------
    ImageError
        With the reason, when the file cannot be decoded into an image: the only exception a file's
        content can cause (see :func:`_reasons`).
    """
    return _decode(path, size, max_pixels, resize)[0]


def _decode(
    source, size: int | tuple[int, int], max_pixels: int, resize: Resize = SQUASH
) -> tuple[np.ndarray, tuple[int, int]]:
    """The recipe: the pixels at ``size`` and the displayed ``(width, height)`` of the whole image."""
    target = (size, size) if isinstance(size, int) else tuple(size)
    with _opened(source, max_pixels) as image:
        full = image.size
        upright = image.getexif().get(ExifTags.Base.Orientation, 1) not in (5, 6, 7, 8)
        if image.format == "JPEG":
            shown = full if upright else full[::-1]
            draft = resize.draft_size(shown, target)
            image.draft("RGB", draft if upright else draft[::-1])
        image.seek(0)  # first frame of an animation
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright
        image = resize.apply(_to_rgb(image, keep_gray=True), target)
        return np.asarray(image.convert("RGB"), dtype=np.uint8), full if upright else full[::-1]


def resize_pixels(pixels: np.ndarray, size: int | tuple[int, int], resize: Resize = SQUASH) -> np.ndarray:
    """An RGB uint8 array ``(height, width, 3)`` resized as :func:`load_image` resizes a decoded file.

    For images already in memory (a camera frame, a dataset loaded as arrays): the same filters,
    so their features match those of the same pixels read from a lossless file.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if pixels.shape[:2] == (height, width) and resize.mode != "crop":
        return pixels
    return np.asarray(resize.apply(Image.fromarray(pixels, "RGB"), (width, height)), dtype=np.uint8)


#: Side of the small decode :func:`probe_image` checks an image with.
_PROBE_SIZE = 64


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Check that ``path`` decodes and return its displayed ``(width, height)``.

    The image goes through :func:`load_image`'s whole recipe at a small size (a reduced JPEG scale),
    so truncated data and anything else the stages would refuse is caught; the size is the one after
    the EXIF orientation is applied. Raises :class:`ImageError` like :func:`load_image`.
    """
    return _decode(path, _PROBE_SIZE, max_pixels)[1]


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (dataset manifests and duplicate checks use it).

    Raises
    ------
    ImageError
        When ``path`` is not a regular file (checked before it is opened: a FIFO would block).
    OSError
        When the file cannot be read.
    """
    check_regular_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()
