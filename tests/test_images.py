"""The one decode path, on real photos and on the broken files real folders contain."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import shared
from PIL import Image

from pyimagesearch_tl.errors import ImageError
from pyimagesearch_tl.images import load_image, probe_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    source = sorted(shared("cats_and_dogs_filtered", "train", "cats").glob("*.jpg"))[0]
    return Path(shutil.copy(source, tmp_path_factory.mktemp("photo") / "cat.jpg"))


def _rgb(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB")


def test_real_photo_decodes_to_square_rgb(photo):
    array = load_image(photo, 224)
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8
    # The same pixels as a full-resolution decode resized by another filter: the draft (reduced DCT)
    # decode and the box filter change detail, not content, channel order or orientation.
    reference = np.asarray(_rgb(photo).resize((224, 224), Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(array.astype(int) - reference).mean() < 4
    assert np.corrcoef(array.ravel(), reference.ravel())[0, 1] > 0.99
    assert np.abs(array[..., ::-1].astype(int) - reference).mean() > 4 * np.abs(array.astype(int) - reference).mean()
    # (width, height): a wide target gives a wide array.
    wide = load_image(photo, (100, 60))
    assert wide.shape == (60, 100, 3)
    assert np.abs(wide.astype(int) - np.asarray(_rgb(photo).resize((100, 60), Image.Resampling.LANCZOS))).mean() < 4


def test_gif_named_jpeg_and_png_named_jpg_decode_by_content(tmp_path, photo):
    gif = shared("hymenoptera_data", "train", "ants", "imageNotFound.gif")
    assert load_image(gif, 64).shape == (64, 64, 3)
    fake = tmp_path / "really_png.jpg"
    _rgb(photo).save(fake, format="PNG")
    assert np.abs(load_image(fake, 64).astype(int) - load_image(photo, 64).astype(int)).mean() < 8


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA"])
def test_every_mode_becomes_the_same_rgb(tmp_path, photo, mode):
    path = tmp_path / f"{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    _rgb(photo).convert(mode).save(path)
    array = load_image(path, 96)
    assert array.shape == (96, 96, 3)
    reference = load_image(photo, 96).astype(int)
    tolerance = 40 if mode in ("L", "LA", "P") else 12  # gray and palette lose colour, not content
    assert np.abs(array.astype(int) - reference).mean() < tolerance


def test_transparent_pixels_are_composited_on_white(tmp_path):
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 16, 32))
    image.save(tmp_path / "alpha.png")
    array = load_image(tmp_path / "alpha.png", 32)
    assert tuple(array[5, 28]) == (255, 255, 255)  # transparent red -> white
    assert tuple(array[5, 3]) == (0, 0, 255)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path, photo):
    gray8 = np.asarray(_rgb(photo).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "gray8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    deep, shallow = load_image(tmp_path / "gray16.png", 64), load_image(tmp_path / "gray8.png", 64)
    assert np.abs(deep.astype(int) - shallow.astype(int)).max() <= 1  # clipping would give 255 nearly everywhere


def test_exif_orientation_is_applied(tmp_path, photo):
    image = _rgb(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    width, height = image.size
    assert probe_image(tmp_path / "rotated.jpg") == (height, width)
    shown = load_image(tmp_path / "rotated.jpg", (height // 4, width // 4))
    expected = np.asarray(image.transpose(Image.Transpose.ROTATE_270).resize((height // 4, width // 4), Image.BILINEAR))
    assert np.abs(shown.astype(int) - expected.astype(int)).mean() < 10


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    array = load_image(tmp_path / "anim.gif", 20)
    assert array[..., 0].mean() > 200 and array[..., 1].mean() < 50


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p, photo: p.write_bytes(photo.read_bytes()[: len(photo.read_bytes()) // 2]), "corrupt"),
        (lambda p, photo: p.write_bytes(photo.read_bytes()[:300]), "corrupt image: (?i:truncated)"),
        (lambda p, photo: p.write_bytes(b""), "empty file"),
        (lambda p, photo: p.write_text("<html><body>404 Not Found</body></html>"), "not an image"),
    ],
    ids=["truncated", "header-truncated", "zero-byte", "html"],
)
def test_broken_files_raise_image_error_with_reason(tmp_path, photo, make, reason):
    path = tmp_path / "broken.jpg"
    make(path, photo)
    with pytest.raises(ImageError, match=reason):
        load_image(path, 64)
    with pytest.raises(ImageError, match=reason):
        probe_image(path)


def test_decompression_bomb_is_refused_by_pixel_count(tmp_path):
    Image.new("L", (4000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png", 64, max_pixels=10_000_000)
    assert load_image(tmp_path / "big.png", 64, max_pixels=20_000_000).shape == (64, 64, 3)


def _load_error(path: Path, drop_to: int | None) -> str:
    """The ImageError message of load_image(path), in a forked child running as uid ``drop_to``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, try to read, report
        message = "no error"
        try:
            if drop_to is not None:
                os.setgid(drop_to)
                os.setuid(drop_to)
            load_image(path, 64)
        except ImageError as exc:
            message = str(exc)
        except BaseException as exc:
            message = repr(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        return pipe.read()


def test_unreadable_file(photo):
    # Root reads any file, so as root the read is tried as the unprivileged 'nobody' (uid 65534),
    # in a world-traversable folder of its own.
    folder = Path(tempfile.mkdtemp(prefix="ptl-unreadable-"))
    try:
        folder.chmod(0o755)
        path = Path(shutil.copy(photo, folder / "locked.jpg"))
        path.chmod(0)
        message = _load_error(path, 65534 if os.geteuid() == 0 else None)
    finally:
        shutil.rmtree(folder)
    assert message == "unreadable file: permission denied"


def test_odd_file_names(tmp_path, photo):
    spaced = Path(shutil.copy(photo, tmp_path / "a cat photo (1).jpg"))
    odd = Path(shutil.copy(photo, os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"))))
    assert load_image(spaced, 32).shape == load_image(odd, 32).shape == (32, 32, 3)


def _scaled_as_before(path: Path, size: int) -> np.ndarray:
    """load_image's 16-bit recipe as first written (a float64 copy of the whole image), for comparison."""
    image = Image.open(path)
    samples = np.asarray(image, dtype=np.float64)
    maximum = 65535.0 if samples.max(initial=0) > 255 or image.mode != "I" else 255.0
    gray = Image.fromarray(np.clip(samples * (255.0 / maximum) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    filter_ = Image.Resampling.BOX if gray.width >= size and gray.height >= size else Image.Resampling.BILINEAR
    return np.asarray(gray.resize((size, size), filter_))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "I-eight-bit"])
def test_sixteen_and_thirty_two_bit_scaling_is_unchanged(tmp_path, mode):
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256 if mode == "I-eight-bit" else 65536, (123, 157))
    if mode == "I;16B":
        image = Image.frombytes(mode, (157, 123), samples.astype(">u2").tobytes())
    else:
        image = Image.fromarray(samples.astype(np.int32 if mode.startswith("I-") or mode == "I" else np.uint16))
    path = tmp_path / "deep.tif"
    image.save(path)
    assert Image.open(path).mode == mode.split("-")[0]
    for size in (64, 300):  # shrinking (box) and enlarging (bilinear)
        assert np.abs(load_image(path, size).astype(int) - _scaled_as_before(path, size)).max() <= 1


MEMORY_PROBE = """
import resource, sys, tracemalloc
from pyimagesearch_tl.images import load_image
load_image(sys.argv[2], 8)  # imports and first-use allocations out of the way
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
assert load_image(sys.argv[1], 224).shape == (224, 224, 3)
traced = tracemalloc.get_traced_memory()[1]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
print(traced // 2**20, grown // 2**10)
"""


def test_large_sixteen_bit_png_decodes_without_a_float64_copy(tmp_path):
    # A 6000 x 6000 16-bit gray gradient: a small file (tens of KB) whose pixels take 69 MiB decoded; a
    # float64 copy would be 275 MiB, with its temporaries nearly 900 MiB.
    row = np.linspace(0, 65535, 6000).astype(np.uint16)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (6000, 6000)))).save(tmp_path / "big16.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big16.png"), str(tmp_path / "small.png")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    traced_mib, grown_mib = map(int, result.stdout.split())
    assert traced_mib < 64, f"numpy/Python allocations peaked at {traced_mib} MiB"
    assert grown_mib < 200, f"the process grew by {grown_mib} MiB"


def test_each_resize_mode_fits_the_image_as_it_says(tmp_path, photo):
    """A 400x200 image of three bands (red | green | blue, the green one 200 px wide in the middle):
    squash keeps all three bands side by side, a centre crop of the whole height is the green band alone,
    at 0.5 only its middle, and letterbox keeps the three bands in the middle rows between gray margins.
    A real photo: the crop is the centre of the squashed image, magnified, and a JPEG decoded at a reduced
    scale for the crop still matches a full-resolution crop."""
    from pyimagesearch_tl.errors import ConfigError
    from pyimagesearch_tl.images import LETTERBOX_FILL, Resize

    bands = np.zeros((200, 400, 3), np.uint8)
    bands[:, :100, 0] = bands[:, 100:300, 1] = bands[:, 300:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    squash = load_image(tmp_path / "bands.png", 64)
    assert squash[:, :14, 0].min() == 255 and squash[:, 18:46, 1].min() == 255 and squash[:, 50:, 2].min() == 255
    crop = load_image(tmp_path / "bands.png", 64, resize=Resize("crop", 1.0))
    assert crop[..., 1].min() == 255 and crop[..., [0, 2]].max() == 0  # the green square in the middle, all of it
    assert (load_image(tmp_path / "bands.png", 64, resize=Resize("crop", 0.5)) == crop).all()  # inside it too
    boxed = load_image(tmp_path / "bands.png", 64, resize=Resize("letterbox"))
    assert (boxed[:16] == LETTERBOX_FILL).all() and (boxed[48:] == LETTERBOX_FILL).all()
    middle = boxed[16:48]
    assert middle[:, :14, 0].min() == 255 and middle[:, 18:46, 1].min() == 255 and middle[:, 50:, 2].min() == 255

    width, height = Image.open(photo).size
    assert width > height  # the cat: 500x374
    side = round(height * 0.875)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    reference = np.asarray(_rgb(photo).resize((224, 224), Image.Resampling.LANCZOS, box=box), dtype=int)
    cropped = load_image(photo, 224, resize=Resize("crop", 0.875)).astype(int)
    assert np.abs(cropped - reference).mean() < 4 and np.corrcoef(cropped.ravel(), reference.ravel())[0, 1] > 0.99
    assert np.abs(cropped - load_image(photo, 224).astype(int)).mean() > 10  # not the squashed image
    with pytest.raises(ConfigError, match="resize must be one of squash, crop, letterbox, got 'zoom'"):
        Resize("zoom")
    with pytest.raises(ConfigError, match="crop_pct must be a number from 0.25 to 1, got 1.5"):
        Resize("crop", 1.5)


def test_pillows_large_image_warning_stays_silent_after_its_filter_was_lost(tmp_path):
    """The decoder's own pixel limit decides; Pillow's DecompressionBombWarning (above 89 million pixels) is
    noise. Its filter, set at import, is gone when the import happened inside warnings.catch_warnings() (as
    in pytest's collection): each open puts it back (the warning reached the suite's summary before)."""
    import warnings

    from PIL import Image

    from pyimagesearch_tl.errors import ImageError
    from pyimagesearch_tl.images import probe_image

    big = tmp_path / "big.png"
    Image.new("1", (9500, 9500)).save(big)  # 90.25 million pixels in a few kB
    with warnings.catch_warnings(record=True) as caught:
        warnings.filters[:] = [f for f in warnings.filters if f[2] is not Image.DecompressionBombWarning]
        with pytest.raises(ImageError, match="pixels"):
            probe_image(big, max_pixels=1000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
