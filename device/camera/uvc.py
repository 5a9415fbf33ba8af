"""OpenCV capture: UVC USB microscope cameras, or a video file."""

from __future__ import annotations

import cv2

from device.camera import Frame
from device.errors import CameraError


class OpenCVCamera:
    name = "opencv"

    def __init__(self, device: str):
        self.device = int(device) if device.isdigit() else device
        self._cap = cv2.VideoCapture(self.device)
        if not self._cap.isOpened():
            raise CameraError(
                f"opencv camera: cannot open {device!r}; check the USB cable or the file path in [camera] opencv_device"
            )

    def capture(self) -> Frame:
        # UVC cameras buffer a few frames; grab and drop them so the still is taken after the press.
        for _ in range(4):
            self._cap.grab()
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise CameraError(f"opencv camera: no frame from {self.device!r} (unplugged, or end of the video)")
        return Frame(
            image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
            source=str(self.device),
            metadata={"backend": "opencv", "width": int(bgr.shape[1]), "height": int(bgr.shape[0])},
        )

    def preview(self, width: int = 640) -> Frame:
        """The newest frame, shrunk to `width` pixels across (a UVC camera streams; no flush needed)."""
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise CameraError(f"opencv camera: no preview frame from {self.device!r} (unplugged, or end of the video)")
        h, w = bgr.shape[:2]
        if w > width:
            bgr = cv2.resize(bgr, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
        return Frame(
            image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
            source=str(self.device),
            metadata={"backend": "opencv", "preview": True},
        )

    def close(self) -> None:
        self._cap.release()

    def __enter__(self) -> OpenCVCamera:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
