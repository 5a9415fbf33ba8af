"""Errors a user can act on. Each message says what was wrong and what to do."""


class LeukoCamError(Exception):
    """Base class: an error with a message meant for the operator, not a stack trace."""


class ConfigError(LeukoCamError):
    """The TOML configuration is invalid."""


class ImageError(LeukoCamError):
    """An image could not be decoded or breaks a size limit."""


class BundleError(LeukoCamError):
    """A model bundle is missing, tampered with, or does not fit this device."""


class CameraError(LeukoCamError):
    """The camera failed or disappeared."""


class StoreError(LeukoCamError):
    """The results store cannot be opened as it is."""


class StoreFullError(LeukoCamError):
    """Not enough disk space to store a capture; nothing was written."""


class NotFoundError(LeukoCamError):
    """The capture, cell or slide asked for does not exist."""


class InputError(LeukoCamError):
    """A request's input is not acceptable (a label, a name, a slide ID); the message says what is."""


class BusyError(LeukoCamError):
    """A capture is already in progress."""


class ConflictError(LeukoCamError):
    """The request is fine but the record's state refuses it now (a slide with unreviewed cells, say)."""
