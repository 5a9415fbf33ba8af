"""Safe image decoding and atomic file writes.

Every image that enters the device (camera file, replay folder, upload) goes
through `decode_image`, which refuses corrupt, truncated, zero-byte and
oversized (decompression-bomb) input with an ImageError that says so. Every
file the device stores goes through `atomic_write_bytes` or, for a capture's
images, `atomic_write_files`, so a power cut leaves either the old file or the
new one, never half of one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from device.errors import ImageError

DEFAULT_MAX_PIXELS = 40_000_000


def check_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Raise ValueError unless image is a uint8 RGB array of shape HxWx3."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 (0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected shape HxWx3 (RGB), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image {image.shape}")
    return image


def as_rgb8(image) -> tuple[np.ndarray | None, str | None]:
    """Bring an image array to the uint8 RGB contract, or say why it cannot be.

    High bit depth (uint16, int32) is scaled by its sensor bit depth (see SENSOR_BITS), float
    in [0, 1] by 255, greyscale is repeated into three channels and an alpha
    channel is dropped; anything else gets a reason instead of an exception.

    Returns:
        (uint8 HxWx3 array, None), or (None, a reason a person can act on).
    """
    if not isinstance(image, np.ndarray):
        return None, f"not an image array ({type(image).__name__})"
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        return None, f"not an image of shape HxW, HxWx3 or HxWx4 (got {image.shape})"
    if image.shape[2] == 4:
        image = image[..., :3]
    # Scale first, then repeat a grey channel: a 16 MP 16-bit frame must not become a float64 RGB copy.
    image, bad = _to_uint8(image)
    if bad is not None:
        return None, bad
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image), None


SENSOR_BITS = (8, 10, 12, 14, 16, 24, 32)
"""Bit depths that cameras and files use: high-depth pixels are scaled by the smallest that holds the
brightest pixel (12-bit sensor data in a 16-bit TIFF is 0-4095, not a dark 0-65535 picture)."""


def _to_uint8(image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Pixel values to 0-255 (any channel count), or a reason."""
    if image.dtype == np.uint8:
        return image, None
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255, None
    if np.issubdtype(image.dtype, np.integer):
        top = int(image.max()) if image.size else 0
        if int(image.min()) < 0:
            return None, f"image has negative pixel values ({image.dtype}): not a camera image"
        needed = int(np.ceil(np.log2(top + 1))) if top > 0 else 8
        bits = next((b for b in SENSOR_BITS if b >= needed), needed)
        return np.rint(image * np.float32(255.0 / (2**bits - 1))).astype(np.uint8), None
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            return None, "image has NaN or infinite pixel values"
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 255:
            return None, f"float image values {lo:.3g}..{hi:.3g} are neither 0-1 nor 0-255"
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(image * scale + 0.5, 0, 255).astype(np.uint8), None
    return None, f"unsupported pixel type {image.dtype}"


def decode_image(
    data: bytes | str | Path | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float | None = None,
    too_big_hint: str = "use a smaller image or raise store.max_image_pixels",
) -> np.ndarray:
    """Decode an image file or bytes into uint8 RGB.

    Size and shape are checked from the header, before any pixel is decoded, so a small
    file that claims a huge or absurdly thin picture costs nothing. 16-bit and 32-bit
    greyscale (PNG, TIFF) is scaled by its bit depth, not clipped (see `as_rgb8`).

    Args:
        data: encoded bytes, a path to an image file, or an open binary file (an upload spooled to disk).
        max_pixels: refuse images with more pixels than this.
        max_aspect: refuse images whose long side is more than this many times the short side.
        too_big_hint: what the message about too many pixels tells the user to do.

    Returns:
        uint8 array HxWx3 in RGB order.

    Raises:
        ImageError: empty, unreadable, truncated, too large or too thin input.
    """
    label = str(data) if isinstance(data, (str, Path)) else "uploaded image"
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise ImageError(f"{label}: cannot read file ({exc.strerror})") from None
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not _has_bytes(source):
        raise ImageError(f"{label}: the file is empty (0 bytes)")
    head = _peek(source, 1024)
    try:
        # Our own limit is checked from the header, before any pixel is decoded; it is capped
        # below PIL's MAX_IMAGE_PIXELS (config validation), so PIL's bomb check is a second net.
        img = Image.open(source)
        _check_size(label, img.size, max_pixels, max_aspect, too_big_hint)
        img.load()
        if img.mode in HIGH_DEPTH_MODES:
            rgb8, why = as_rgb8(np.asarray(img))
            if rgb8 is None:
                raise ImageError(f"{label}: {why}")
            return rgb8
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: refused as a decompression bomb (too many pixels)") from None
    except Exception as exc:  # PIL raises many types for corrupt or truncated data
        raise ImageError(
            f"{label}: not a readable image: {_unreadable_reason(exc, head)}; "
            "use a JPEG, PNG, BMP or TIFF file that opens in an image viewer"
        ) from None
    try:
        return _rgb_pixels(rgb)
    finally:
        img.close()
        rgb.close()


HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
"""PIL modes of more than 8 bits a pixel (greyscale): converting them to RGB would clip, not scale."""


def _has_bytes(fh) -> bool:
    return bool(_peek(fh, 1))


def _peek(fh, n: int) -> bytes:
    pos = fh.tell()
    first = fh.read(n)
    fh.seek(pos)
    return first


IMAGE_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF8": "GIF",
}
"""First bytes of the image formats people upload, to tell a damaged image from a file that is no image."""
OTHER_SIGNATURES = {b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive"}


def _unreadable_reason(exc: Exception, head: bytes) -> str:
    """Why PIL could not decode a file, in words: what the file is (or is not), never exception names or reprs."""
    fmt = next((name for sig, name in IMAGE_SIGNATURES.items() if head.startswith(sig)), None)
    if "truncated" in str(exc).lower():
        what = f"the {fmt} file" if fmt else "the file"
        return f"{what} is truncated (cut short: an incomplete copy or download)"
    if not isinstance(exc, Image.UnidentifiedImageError):
        return f"the {fmt + ' ' if fmt else ''}image data is damaged (the decoder could not read it to the end)"
    other = next((name for sig, name in OTHER_SIGNATURES.items() if head.startswith(sig)), None)
    if other:
        return f"it is {other}, not an image"
    if _looks_like_text(head):  # before the signatures: a note that starts with "BM" is still a note
        return "it is a text file, not an image"
    if fmt:
        return f"it starts like a {fmt} image but is truncated or damaged (an incomplete copy or download?)"
    return "the file is not in any image format LeukoCam reads"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the peek
            return False
        text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    return bool(text) and all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


def _check_size(label: str, size: tuple[int, int], max_pixels: int, max_aspect: float | None, hint: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} = {w * h / 1e6:.1f} MP is over the {max_pixels / 1e6:.1f} MP limit; {hint}")
    if max_aspect is not None and min(w, h) > 0 and max(w, h) / min(w, h) > max_aspect:
        raise ImageError(
            f"{label}: {w}x{h} is too thin (sides more than {max_aspect:g} to 1): "
            "not a microscope field or a cell; upload the photo as the camera took it"
        )


def _rgb_pixels(img: Image.Image) -> np.ndarray:
    """A decoded RGB PIL image as a new uint8 HxWx3 array, with one frame of extra memory at the peak.

    PIL keeps RGB at 4 bytes a pixel (49 MB for 12 MP). `np.array(img)` goes through `tobytes`, which
    holds its output twice (a list of chunks, then their join): 123 MB at the peak for one 37 MB frame.
    Here PIL's raw encoder (what `tobytes` uses) writes its chunks straight into the array.
    """
    w, h = img.size
    out = np.empty((h, w, 3), np.uint8)
    flat = out.reshape(-1)
    try:
        encoder = Image._getencoder("RGB", "raw", "RGB")  # noqa: SLF001 (the encoder tobytes uses)
        encoder.setimage(img.im, (0, 0, w, h))
    except Exception:  # an older or newer PIL without it: the plain (hungrier) copy
        return np.array(img, dtype=np.uint8)
    try:
        pos, code = 0, 0
        while not code:
            _, code, chunk = encoder.encode(max(65536, w * 4))
            flat[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
    finally:
        encoder.cleanup()
    if code < 0 or pos != flat.size:
        raise ImageError(f"could not unpack the decoded pixels (PIL raw encoder error {code})")
    return out


def encode_image(rgb: np.ndarray, fmt: str = "JPEG", quality: int = 92) -> bytes:
    """Encode a uint8 RGB array as JPEG or PNG bytes (for the appliance's cell crops, `device.pipeline.encode_crop_png`)."""
    check_rgb(rgb)
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        # frombuffer shares the array's memory (fromarray would copy a 37 MB frame).
        rgb = np.ascontiguousarray(rgb)
        Image.frombuffer("RGB", (rgb.shape[1], rgb.shape[0]), rgb, "raw", "RGB", 0, 1).save(
            buf, format="JPEG", quality=quality
        )
    elif fmt.upper() == "PNG":
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(rgb).save(buf, format=fmt.upper())
    return buf.getvalue()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write data to path via a temp file, fsync and rename.

    A reader (or a reboot after a power cut) sees either no file or the whole
    file. The temp file has a `.tmp` suffix so that start-up reconcile can
    recognise leftovers.
    """
    path = Path(path)
    atomic_write_files(path.parent, {path.name: data})
    return path


def atomic_write_files(folder: str | Path, files: dict[str, bytes]) -> None:
    """Write several files into one folder, each as `atomic_write_bytes` would, with one fsync of the folder.

    Every file's bytes are on disk before its name appears (temp file, fsync, rename), and the renames are made
    durable together: a capture's ten cell images cost eleven fsyncs instead of twenty (an SD card's fsync is
    milliseconds). Each file is atomic, not the set: an error part-way through the renames leaves the files
    renamed so far under their names (the store writes into a new folder and removes it on an error). On an
    error the temp files not yet renamed are removed and the error is raised.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[str, Path]] = []
    try:
        for name, data in files.items():
            pending.append((_write_temp(folder / name, data), folder / name))
        while pending:
            tmp, path = pending[0]
            os.replace(tmp, path)
            pending.pop(0)
    except BaseException:
        for tmp, _ in pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    fsync_dir(folder)


def _write_temp(path: Path, data: bytes) -> str:
    """Write data to a new temp file beside path (`.NAME.XXXX.tmp`) and fsync it; returns the temp file's path.
    A failed write leaves no temp file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return tmp
