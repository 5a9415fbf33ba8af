"""Camera backends behind one small interface, chosen by name from the config.

Every backend returns RGB uint8 frames: colour order is converted here, at the
edge, so nothing downstream guesses. Only `device/camera/picam.py` may import
picamera2 (it cannot be imported off a Pi).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from device.config import Config
from device.errors import ConfigError


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    """uint8 RGB HxWx3."""
    source: str
    """Where it came from: a file name for replay, the device for a camera."""
    metadata: dict = field(default_factory=dict)
    """Camera metadata kept with the capture (exposure, gain, white balance, ...)."""


class Camera(Protocol):
    name: str

    def capture(self) -> Frame:
        """Take one full-resolution still, exposed after this call started."""

    def close(self) -> None:
        """Release the device."""

    def preview(self) -> Frame:
        """A low-resolution RGB frame for the dashboard's live view (not exposure-checked).

        Raises CameraError when the camera cannot give one right now.
        """

    def __enter__(self) -> Camera: ...

    def __exit__(self, *exc) -> None: ...


def build_camera(config: Config) -> Camera:
    """Create the backend that [camera] backend names."""
    backend = config.camera.backend
    if backend == "replay":
        from device.camera.replay import ReplayCamera

        return ReplayCamera(
            config.replay_dir, max_pixels=config.store.max_image_pixels, preview_width=config.camera.preview_width
        )
    if backend == "opencv":
        from device.camera.uvc import OpenCVCamera

        return OpenCVCamera(config.camera.opencv_device)
    if backend == "picamera2":
        from device.camera.picam import PiCamera

        return PiCamera(config.camera)
    raise ConfigError(f"camera.backend = {backend!r}: expected one of replay, opencv, picamera2")
