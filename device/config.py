"""The device configuration: TOML in, a typed frozen object out.

Validated once at start-up. Unknown keys and wrong types are errors that name
the file, the key and what was expected. The dataclass defaults are the
embedded default that `make run` uses: the replay camera over the shipped
sample fields and the shipped demo bundle.

Every command that takes a config finds it the same way (`resolve_config_path`):
--config, then $LEUKOCAM_CONFIG, then /etc/leukocam/leukocam.toml when it
exists, then the embedded default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import shlex
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_BUNDLE = PACKAGE_DIR / "demo" / "bundle"
DEMO_FIELDS = PACKAGE_DIR / "demo" / "fields"
MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused unread (it is a few kilobytes of TOML)."""
MAX_THREADS = 64
CONFIG_ENV = "LEUKOCAM_CONFIG"
"""Environment variable naming the config file when a command gets no --config."""
SYSTEM_CONFIG = Path("/etc/leukocam/leukocam.toml")
"""The installed rig's config (firmware_config/install.sh writes it): used when neither --config nor
$LEUKOCAM_CONFIG names one and this file exists."""
EMBEDDED = "<embedded default>"


@dataclass(frozen=True)
class CameraConfig:
    backend: str = "replay"
    """Which camera: "replay" (a folder of images), "opencv" (UVC camera or video file) or "picamera2" (Pi camera)."""
    replay_dir: str = ""
    """Folder of field images for the replay camera; empty means the shipped synthetic sample fields."""
    opencv_device: str = "0"
    """OpenCV source: a camera index such as "0", or a video file path."""
    retries: int = 3
    """How often a failed capture is retried before the error is reported."""
    width: int = 0
    """picamera2 still width in pixels; 0 = the sensor's full resolution (4056 on the HQ camera)."""
    height: int = 0
    """picamera2 still height in pixels; 0 = the sensor's full resolution (3040 on the HQ camera)."""
    exposure_us: int = 0
    """picamera2 fixed exposure time in microseconds; 0 = let auto-exposure settle once, then lock it."""
    analogue_gain: float = 0.0
    """picamera2 fixed analogue gain; 0 = settle automatically once, then lock."""
    awb_red: float = 0.0
    """picamera2 fixed red white-balance gain (ColourGains); 0 (with awb_blue 0) = settle once, then lock."""
    awb_blue: float = 0.0
    """picamera2 fixed blue white-balance gain (ColourGains); 0 (with awb_red 0) = settle once, then lock."""
    preview_width: int = 640
    """Width of the low-resolution preview frames for the dashboard."""

    def validate(self) -> None:
        _choice("camera.backend", self.backend, ("replay", "opencv", "picamera2"))
        _between("camera.retries", self.retries, 0, 100)
        for key in ("width", "height"):
            _between(f"camera.{key}", getattr(self, key), 0, 16384)
        _between("camera.exposure_us", self.exposure_us, 0, 1_000_000_000)  # the HQ camera's longest is ~670 s
        _between("camera.analogue_gain", self.analogue_gain, 0.0, 64.0)
        for key in ("awb_red", "awb_blue"):
            _between(f"camera.{key}", getattr(self, key), 0.0, 32.0)  # libcamera's ColourGains range
        _between("camera.preview_width", self.preview_width, 64, 4096)
        if (self.awb_red == 0) != (self.awb_blue == 0):
            raise ConfigError(
                "camera.awb_red and camera.awb_blue: set both (fixed white balance) or neither (auto, then locked)"
            )


@dataclass(frozen=True)
class TriggerConfig:
    enabled: bool = False
    """Use a GPIO push button (and LED); off in the embedded default, which has no GPIO."""
    button_pin: int = 17
    """BCM pin of the capture button (wired to ground; the internal pull-up is used). 17 = physical pin 11."""
    bounce_ms: int = 50
    """Debounce time of the button."""
    long_press_s: float = 2.0
    """Holding the button this long starts a new slide instead of capturing."""
    led_pin: int = 27
    """BCM pin of the status LED (27 = physical pin 13); 0 = no LED."""
    buzzer_pin: int = 0
    """BCM pin of an optional active buzzer; 0 = none."""

    def validate(self) -> None:
        _between("trigger.button_pin", self.button_pin, 2, 27)
        _between("trigger.led_pin", self.led_pin, 0, 27)
        _between("trigger.buzzer_pin", self.buzzer_pin, 0, 27)
        _between("trigger.bounce_ms", self.bounce_ms, 1, 1000)
        _between("trigger.long_press_s", self.long_press_s, 0.3, 30.0)
        used = [p for p in (self.button_pin, self.led_pin, self.buzzer_pin) if p]
        if len(used) != len(set(used)):
            raise ConfigError(f"trigger: button_pin, led_pin and buzzer_pin must differ, got {used}")


@dataclass(frozen=True)
class ModelConfig:
    bundle: str = ""
    """Path of the model bundle folder; empty means the shipped synthetic demo bundle."""
    threads: int = 2
    """Interpreter threads (a Pi 4/5 has 4 cores; leave some for the camera and the web server)."""
    self_test: bool = True
    """Run the bundle's golden crops at start-up and refuse a bundle that fails them."""

    def validate(self) -> None:
        _between("model.threads", self.threads, 1, MAX_THREADS)


@dataclass(frozen=True)
class FinderConfig:
    """The [finder] section of leukocam.toml: what the operator sets (the algorithm's own
    parameters are `device.cells.FinderParams`)."""

    um_per_px: float = 0.0
    """Pixel size of the field image in micrometres, from `leukocam calibrate` (one value per objective and
    camera); 0 measures it on every field from the red cells (slow on 12 MP, and unknown on packed fields)."""
    scale_check: bool = True
    """With a calibrated um_per_px, check each field's red cells cheaply and warn when they disagree."""
    max_cells: int = 50
    """At most this many white cells are classified per field (the rest are reported as skipped)."""

    def validate(self) -> None:
        _between("finder.um_per_px", self.um_per_px, 0.0, 100.0)
        _between("finder.max_cells", self.max_cells, 1, 10_000)


@dataclass(frozen=True)
class QualityConfig:
    min_focus: float = 4.0
    """Lowest accepted variance of the Laplacian (on a 0-255 grey image at working scale); below it the field is blurred."""
    max_clipped_fraction: float = 0.05
    """Highest accepted fraction of pixels at 0 or 255 in any channel (over- or under-exposure)."""

    def validate(self) -> None:
        _at_least("quality.min_focus", self.min_focus, 0.0)
        _between("quality.max_clipped_fraction", self.max_clipped_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class StoreConfig:
    data_dir: str = "var/leukocam"
    """Where the SQLite database and the image files live (on the Pi: /var/lib/leukocam)."""
    min_free_mb: int = 200
    """A capture is refused, and nothing written, when less disk space than this is free."""
    max_image_pixels: int = 16_000_000
    """Images larger than this many pixels are refused (decompression-bomb guard; 12 MP HQ frames fit)."""
    max_images_mb: int = 0
    """Retention cap for stored images; over it, the oldest captures of REVIEWED slides are deleted. 0 = no cap."""

    def validate(self) -> None:
        _between("store.min_free_mb", self.min_free_mb, 0, 10**12)  # 1 EB: "more than any disk" stays valid
        # PIL refuses more than its MAX_IMAGE_PIXELS (89.5 MP) as a decompression bomb anyway.
        _between("store.max_image_pixels", self.max_image_pixels, 1, 89_000_000)
        _between("store.max_images_mb", self.max_images_mb, 0, 100_000_000)


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    """Address to listen on. 127.0.0.1 is this machine only; 0.0.0.0 is the whole lab network."""
    port: int = 8080
    """TCP port of the dashboard."""
    threads: int = 4
    """WSGI worker threads."""
    max_upload_mb: int = 40
    """Largest accepted upload."""
    secure_cookies: bool = False
    """Send the session cookie over HTTPS only (set when a TLS proxy fronts the dashboard)."""
    login: str = "auto"
    """"auto": a login is required whenever the dashboard listens beyond this machine; "always": also on loopback."""
    max_connections: int = 200
    """Open connections the server keeps at once; more wait in the kernel's queue until one closes."""
    client_timeout_s: int = 15
    """A connection that sends nothing for this long (an idle or half-sent request) is closed."""

    def validate(self) -> None:
        _host("web.host", self.host)
        _between("web.port", self.port, 1, 65535)
        _between("web.threads", self.threads, 1, 256)
        _between("web.max_upload_mb", self.max_upload_mb, 1, 1024)
        _choice("web.login", self.login, ("auto", "always"))
        _between("web.max_connections", self.max_connections, 10, 1000)
        _between("web.client_timeout_s", self.client_timeout_s, 2, 600)


@dataclass(frozen=True)
class ServiceConfig:
    startup_captures: int = 3
    """Captures taken automatically at start-up (the demo shows results without a button press); 0 on a rig."""
    slide_id: str = ""
    """Slide that new captures belong to until the operator starts another; empty = a dated default."""

    def validate(self) -> None:
        _between("service.startup_captures", self.startup_captures, 0, 1000)


@dataclass(frozen=True)
class SlidesConfig:
    """The [slides] section: when a slide has enough cells, and what its blast fraction is compared against."""

    target_cells: int = 200
    """White cells to classify per slide before its blast fraction is read (a 200-cell differential, as by hand)."""
    decision_threshold: float = 0.20
    """Blast fraction the slide's 95 % confidence interval is compared against (0.20: the WHO's 20 % blasts)."""

    def validate(self) -> None:
        _between("slides.target_cells", self.target_cells, 10, 10_000)
        if not 0.0 < self.decision_threshold < 1.0:  # NaN too
            raise ConfigError(
                f"slides.decision_threshold = {self.decision_threshold!r}: expected a fraction between 0 and 1, "
                "both excluded (0.20 = 20 % blasts)"
            )


@dataclass(frozen=True)
class Config:
    camera: CameraConfig = field(default_factory=CameraConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finder: FinderConfig = field(default_factory=FinderConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    web: WebConfig = field(default_factory=WebConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    slides: SlidesConfig = field(default_factory=SlidesConfig)
    source: str = EMBEDDED
    """Where this configuration came from (for messages and the status page)."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()

    @property
    def bundle_path(self) -> Path:
        return Path(self.model.bundle) if self.model.bundle else DEMO_BUNDLE

    @property
    def replay_dir(self) -> Path:
        return Path(self.camera.replay_dir) if self.camera.replay_dir else DEMO_FIELDS

    def command(self, *args: str) -> str:
        """The exact `leukocam` command line that acts on this configuration, for hints shown to people.

        A config read from a file is named with --config (as an absolute path), so the command works from
        any folder, under sudo and without the environment variable; the embedded default needs none.
        """
        words = ["leukocam", args[0]] if args else ["leukocam"]
        if self.source != EMBEDDED:
            words += ["--config", str(Path(self.source).absolute())]
        return shlex.join([*words, *args[1:]])


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # NaN too
        raise ConfigError(f"{key} = {value!r}: expected a value >= {low}")


def _between(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} = {value!r}: expected a value between {low} and {high}")


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host(key: str, value: str) -> None:
    """An IPv4 or IPv6 address (IPv6 may be in brackets) or a plausible DNS host name; not resolved here."""
    if _is_ip(value[1:-1] if value.startswith("[") and value.endswith("]") else value):
        return
    labels = value.removesuffix(".").split(".")
    numeric = all(label.isdigit() for label in labels)  # 999.1.1.1 is a bad IPv4 address, not a name
    if numeric or len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            f"{key} = {value!r}: expected an IP address or a host name "
            "(127.0.0.1 = this machine only, 0.0.0.0 = the whole lab network, or a name such as leukocam.local)"
        )


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _type_ok(expected: object, value: object) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _build(cls: type, data: dict, prefix: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        name = unknown[0] if unknown[0].isprintable() else repr(unknown[0])
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{name} in {where}; allowed keys: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        expected = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{key}] table, got {type(value).__name__}")
            kwargs[name] = _build(expected, value, key)
        elif isinstance(expected, types.UnionType) or not _type_ok(expected, value):
            raise ConfigError(
                f"{key} = {value!r}: expected {getattr(expected, '__name__', expected)}, got {type(value).__name__}"
            )
        else:
            _value_ok(key, value)
            kwargs[name] = float(value) if expected is float else value
    return cls(**kwargs)


def _value_ok(key: str, value: object) -> None:
    """Checks every key of its type needs, whatever its range: finite floats, no NUL in strings."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: expected a finite number, not nan or inf")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{key} = {value!r}: expected text without NUL characters (\\u0000)")


def parse_config(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from a parsed TOML mapping."""
    try:
        cfg = _build(Config, data, "")
        cfg = dataclasses.replace(cfg, source=source)
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def resolve_config_path(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """Which config file a command uses, and why: the one discovery order every `leukocam` command shares.

    1. `explicit` (the command's --config), 2. the file named by $LEUKOCAM_CONFIG, 3. SYSTEM_CONFIG
    (/etc/leukocam/leukocam.toml) when it exists, 4. None: the embedded default. A file named by 1 or 2
    that does not exist is not skipped: loading it fails and says so.

    Returns:
        (path or None for the embedded default, how it was chosen: for log lines and messages)
    """
    if explicit not in (None, ""):
        return Path(explicit), "--config"
    env = os.environ.get(CONFIG_ENV, "")
    if env.strip():
        return Path(env), f"${CONFIG_ENV}"
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "the installed system config"
    return None, f"no --config, ${CONFIG_ENV} or {SYSTEM_CONFIG}"


def discover_config(explicit: str | Path | None = None) -> tuple[Config, str]:
    """Load the config `resolve_config_path` picks; returns it with a phrase saying how it was chosen."""
    path, how = resolve_config_path(explicit)
    if path is not None and how == f"${CONFIG_ENV}" and not path.exists():
        raise ConfigError(f"{path}: config file not found (named by ${CONFIG_ENV}); correct or unset {CONFIG_ENV}")
    return load_config(path), how


def load_config(path: str | Path | None = None) -> Config:
    """Load a TOML file, or return the embedded default when path is None."""
    if path is None:
        cfg = Config()
        cfg.validate()
        return cfg
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing file to --config") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MB, not a LeukoCam config file")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: the file is UTF-16 text; save it as UTF-8 TOML")
    if b"\0" in raw:
        raise ConfigError(f"{path}: not a text file (it has NUL bytes: binary or UTF-16); save it as UTF-8 TOML")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is harmless
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8 TOML"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax at that line") from None
    return parse_config(data, source=str(path))
