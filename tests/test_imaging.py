"""Tests for safe image decoding, encoding and atomic writes (device/imaging.py).

Every input is a real encoded file made with PIL or `encode_image`; the
decompression-bomb inputs are real PNG headers that declare a huge size over a
tiny (and deliberately undecodable) body, so a refusal proves the size was
checked before any pixel was decoded.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.errors import ImageError
from device.imaging import (
    DEFAULT_MAX_PIXELS,
    atomic_write_bytes,
    atomic_write_files,
    check_rgb,
    decode_image,
    encode_image,
)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A gradient image: JPEG keeps it close, unlike random noise."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1).astype(np.uint8)


def _pil_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB but whose pixel data is empty."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def _tmp_leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


# -- decode: good input ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_decode_lossless_formats_round_trip_exactly(fmt):
    rgb = _rgb()
    out = decode_image(_pil_bytes(Image.fromarray(rgb), fmt))
    assert out.dtype == np.uint8
    assert out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, rgb)


def test_decode_jpeg_bytes_gives_close_rgb():
    rgb = _smooth_rgb()
    out = decode_image(encode_image(rgb, "JPEG", quality=95))
    assert out.dtype == np.uint8
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 3
    # channel order is RGB: the red channel grows left to right, green top to bottom
    assert out[24, -1, 0] > 200 and out[24, 0, 0] < 40
    assert out[-1, 32, 1] > 200 and out[0, 32, 1] < 40


@pytest.mark.parametrize("as_str", [False, True])
def test_decode_from_path(tmp_path, as_str):
    rgb = _rgb(10, 12)
    path = tmp_path / "field.png"
    path.write_bytes(encode_image(rgb, "PNG"))
    out = decode_image(str(path) if as_str else path)
    np.testing.assert_array_equal(out, rgb)


def test_decode_grayscale_png_becomes_three_equal_channels():
    grey = np.arange(0, 200, dtype=np.uint8).reshape(10, 20)
    out = decode_image(_pil_bytes(Image.fromarray(grey, mode="L"), "PNG"))
    assert out.shape == (10, 20, 3)
    assert out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_decode_rgba_png_drops_alpha():
    rgba = np.random.default_rng(1).integers(0, 256, size=(8, 9, 4), dtype=np.uint8)
    out = decode_image(_pil_bytes(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out.shape == (8, 9, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_decode_returns_a_writable_copy():
    out = decode_image(encode_image(_rgb(), "PNG"))
    out[0, 0] = 7  # must not raise "assignment destination is read-only"
    assert out.flags.writeable and out.flags.c_contiguous


# -- decode: bad input -----------------------------------------------------------------------


def test_decode_zero_bytes_says_empty(tmp_path):
    with pytest.raises(ImageError, match=r"empty \(0 bytes\)"):
        decode_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        decode_image(empty)
    assert str(empty) in str(info.value)


def test_decode_random_garbage_is_not_a_readable_image():
    garbage = np.random.default_rng(2).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_image(garbage)
    assert "uploaded image" in str(info.value)
    assert "JPEG, PNG" in str(info.value)  # says what to use instead


def test_decode_truncated_jpeg_says_truncated():
    data = encode_image(_rgb(64, 64, seed=3), "JPEG")
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_image(data[: len(data) // 2])
    assert "truncated" in str(info.value).lower()


def test_decode_text_file_named_jpg(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is a lab note, not a photo\n" * 20)
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_image(fake)
    assert "notes.jpg" in str(info.value)


PYTHON_INTERNALS = ("Error", "0x", "object at", "<_io", "Traceback", "PIL")


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    png = encode_image(_rgb(64, 64, seed=5), "PNG")
    return {
        "garbage": (
            np.random.default_rng(2).integers(0, 256, size=4096, dtype=np.uint8).tobytes(),
            "not in any image format",
        ),
        "truncated PNG": (png[: len(png) // 2], "PNG file is truncated"),
        "PNG header only": (png[:40], "starts like a PNG image but is truncated or damaged"),
        "damaged PNG": (png[:100] + bytes(60) + png[160:], "PNG image data is damaged"),
        "text file": ("Befund: 3 Blasten / 100 Zellen, µm\n".encode() * 30, "it is a text file, not an image"),
        "PDF": (b"%PDF-1.7\n" + bytes(range(256)) * 4, "it is a PDF document, not an image"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_unreadable_files_are_explained_without_python_internals(tmp_path, case):
    """Issue #13: no exception class names or object reprs; what the file is not, and what to use instead."""
    data, says = _bad_inputs()[case]
    for source, label in ((data, "uploaded image"), (tmp_path / "field.jpg", "field.jpg")):
        if isinstance(source, Path):
            source.write_bytes(data)
        with pytest.raises(ImageError) as info:
            decode_image(source)
        msg = str(info.value)
        assert label in msg and "not a readable image" in msg and says in msg, msg
        assert "use a JPEG, PNG, BMP or TIFF file" in msg
        for internal in PYTHON_INTERNALS:
            assert internal not in msg, msg


def test_decode_missing_path_says_cannot_read(tmp_path):
    missing = tmp_path / "nope" / "field.jpg"
    with pytest.raises(ImageError, match="cannot read file") as info:
        decode_image(missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert "No such file" in msg


def test_decode_refuses_image_over_max_pixels_before_decoding():
    # 8000 x 6000 = 48 MP: over the 40 MP default, under PIL's own bomb threshold. The body is
    # empty, so only a size check made before decoding can produce the limit message.
    with pytest.raises(ImageError, match="over the 40.0 MP limit") as info:
        decode_image(_png_header_only(8000, 6000))
    assert "8000x6000" in str(info.value)
    assert "max_image_pixels" in str(info.value)  # names the setting to change
    assert DEFAULT_MAX_PIXELS == 40_000_000


def test_decode_respects_a_low_max_pixels_on_a_real_image():
    data = encode_image(_rgb(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)  # exactly at the limit
    with pytest.raises(ImageError, match="limit") as info:
        decode_image(data, max_pixels=9_999)
    assert "100x100" in str(info.value)


def test_decode_refuses_a_huge_declared_size_as_a_bomb():
    # 20000 x 20000 = 400 MP: PIL refuses it on open, and decode_image reports that as a bomb.
    with pytest.raises(ImageError, match="decompression bomb|limit") as info:
        decode_image(_png_header_only(20000, 20000))
    assert "pixels" in str(info.value) or "MP" in str(info.value)


def test_decode_a_real_compressed_bomb_png():
    # A real, fully valid 1-bit PNG of 9000 x 9000 (81 MP) that compresses to a few kB.
    data = _pil_bytes(Image.new("1", (9000, 9000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageError, match="limit"):
        decode_image(data)


# -- encode / check_rgb ----------------------------------------------------------------------


def test_encode_png_round_trip_is_exact():
    rgb = _rgb(17, 23)
    data = encode_image(rgb, "PNG")
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_image(data), rgb)


def test_encode_jpeg_round_trip_is_close():
    rgb = _smooth_rgb()
    data = encode_image(rgb)  # JPEG is the default
    assert data[:3] == b"\xff\xd8\xff"
    out = decode_image(data)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 3


def test_encode_refuses_non_rgb():
    with pytest.raises(ValueError, match="HxWx3"):
        encode_image(np.zeros((4, 4), dtype=np.uint8), "PNG")


def test_check_rgb_accepts_and_returns_the_array():
    rgb = _rgb(2, 3)
    assert check_rgb(rgb) is rgb


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "dtype uint8"),
        (np.zeros((4, 4, 3), dtype=np.float64), "float64"),
        (np.zeros((4, 4), dtype=np.uint8), r"HxWx3 \(RGB\), got \(4, 4\)"),
        (np.zeros((4, 4, 4), dtype=np.uint8), r"HxWx3 \(RGB\), got \(4, 4, 4\)"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty image"),
        ([[[0, 0, 0]]], "numpy array, got list"),
    ],
)
def test_check_rgb_rejects_with_the_problem_named(array, problem):
    with pytest.raises(ValueError, match=problem) as info:
        check_rgb(array, name="crop")
    assert str(info.value).startswith("crop:")


# -- atomic_write_bytes ----------------------------------------------------------------------


def test_atomic_write_creates_parents_and_writes(tmp_path):
    target = tmp_path / "a" / "b" / "field.jpg"
    assert atomic_write_bytes(target, b"first") == target
    assert target.read_bytes() == b"first"
    assert _tmp_leftovers(target.parent) == []


def test_atomic_write_replaces_old_content(tmp_path):
    target = tmp_path / "x.bin"
    atomic_write_bytes(str(target), b"old content that is longer")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]


def _fail_replace(*args, **kwargs):
    raise OSError(errno.EIO, "simulated I/O error during rename")


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(("name", "failing"), [("replace", _fail_replace), ("fsync", _fail_fsync)])
def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch, name, failing):
    target = tmp_path / "result.png"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, name, failing)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new data that never lands")
    monkeypatch.undo()
    assert info.value.errno in (errno.EIO, errno.ENOSPC)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["result.png"]


def test_atomic_write_files_writes_each_file_whole_and_leaves_no_temp_file(tmp_path, monkeypatch):
    folder = tmp_path / "capture"
    atomic_write_files(folder, {"a.png": b"A", "b.jpg": b"BB", "c.png": b"CCC"})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"a.png": b"A", "b.jpg": b"BB", "c.png": b"CCC"}
    # The disk fills on the third file: the two written temp files go again and no name appears.
    calls = []

    def fsync_fills_up(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_fills_up)
    with pytest.raises(OSError, match="No space"):
        atomic_write_files(tmp_path / "next", {"a.png": b"1", "b.png": b"2", "c.png": b"3", "d.png": b"4"})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "next") == []


def test_atomic_write_files_failing_part_way_through_the_renames(tmp_path, monkeypatch):
    # Each file is atomic, not the set: the first rename stands, the rest stay temp files and are removed.
    real, calls = os.replace, []

    def replace_fails_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated I/O error during rename")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_second)
    with pytest.raises(OSError, match="rename"):
        atomic_write_files(tmp_path, {"a.png": b"A", "b.png": b"B", "c.png": b"C"})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.png"] and (tmp_path / "a.png").read_bytes() == b"A"


def test_atomic_write_failure_on_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _fail_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "new.png", b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
