"""LeukoCam device side: everything that runs on the Raspberry Pi.

This package never imports TensorFlow; `training` and `convert` import from it,
never the other way round (see docs/design.md).
"""

__version__ = "0.1.0"
