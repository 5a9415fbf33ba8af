"""The replay camera: serves the image files of a folder in name order, looping.

It is the embedded default (the shipped synthetic sample fields) and a peer of
the real cameras: it decodes with the same safe decoder and returns RGB.
"""

from __future__ import annotations

import threading
from pathlib import Path

from device.camera import Frame
from device.errors import CameraError, ImageError
from device.imaging import DEFAULT_MAX_PIXELS, decode_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


class ReplayCamera:
    name = "replay"

    def __init__(
        self, folder: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, loop: bool = True, preview_width: int = 640
    ):
        self.folder = Path(folder)
        self.preview_width = preview_width
        self.max_pixels = max_pixels
        self.loop = loop
        self._index = 0
        self._lock = threading.Lock()
        if not self.folder.is_dir():
            raise CameraError(
                f"replay camera: folder {self.folder} not found; set [camera] replay_dir to a folder of images"
            )
        if not self._files():
            raise CameraError(f"replay camera: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.folder}")

    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def capture(self) -> Frame:
        # The folder is listed on every capture: a file removed while running is an error, not a crash.
        files = self._files()
        if not files:
            raise CameraError(f"replay camera: the folder {self.folder} is empty or gone")
        with self._lock:
            if self._index >= len(files):
                if not self.loop:
                    raise CameraError("replay camera: no more images")
                self._index = 0
            path = files[self._index]
            self._index += 1
        try:
            image = decode_image(path, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise CameraError(f"replay camera: {exc}") from None
        return Frame(image=image, source=path.name, metadata={"backend": "replay", "file": path.name})

    def preview(self) -> Frame:
        """A small RGB copy of the image the next capture will return (what the operator would see)."""
        import cv2

        files = self._files()
        if not files:
            raise CameraError(f"replay camera: the folder {self.folder} is empty or gone")
        path = files[self._index % len(files)]
        try:
            image = decode_image(path, max_pixels=self.max_pixels)
        except ImageError as exc:
            raise CameraError(f"replay camera: {exc}") from None
        h, w = image.shape[:2]
        width = self.preview_width
        if w > width:
            image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
        return Frame(image=image, source=path.name, metadata={"backend": "replay", "file": path.name, "preview": True})

    def close(self) -> None:
        pass

    def __enter__(self) -> ReplayCamera:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
