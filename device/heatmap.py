"""Heatmap overlays for the dashboard: a CAM upsampled onto its crop."""

from __future__ import annotations

import cv2
import numpy as np

from device.imaging import check_rgb


def upsample(cam01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 0-1 map (h x w float) to (height, width) with bicubic interpolation, clipped to 0-1."""
    h, w = size
    return np.clip(cv2.resize(cam01.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def colorize(cam01: np.ndarray) -> np.ndarray:
    """Map a 0-1 map to the JET palette as uint8 RGB."""
    grey = np.uint8(np.round(np.clip(cam01, 0.0, 1.0) * 255))
    # cv2.applyColorMap returns BGR; everything past the camera edge is RGB.
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(crop: np.ndarray, cam01: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a 0-1 heatmap over a uint8 RGB crop; returns uint8 RGB of the crop's size."""
    check_rgb(crop, "crop")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = colorize(upsample(cam01, crop.shape[:2]))
    return cv2.addWeighted(crop, 1.0 - alpha, heat, alpha, 0.0)
