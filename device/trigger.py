"""The capture button and the status LED/buzzer at the microscope (gpiozero).

The only module that imports gpiozero, and only inside `Trigger.__init__`, so
importing it needs no GPIO backend. gpiozero calls its callbacks on its own
threads (the pin's edge thread and the button's hold thread); those callbacks
only classify the press and put an event on a small queue. A worker thread of
the Trigger calls the service's handlers, so a slow handler never blocks the
GPIO thread, and an exception in a handler is logged and never kills anything.

A press is short (released before `long_press_s`: `on_press`) or long (held
past it: `on_long_press`, fired while the button is still down); each press
gives exactly one of the two. Besides gpiozero's `bounce_time`, which the pin
backends implement differently (lgpio filters, RPi.GPIO ignores a window, the
mock pins not at all), a press shorter than `bounce_ms` counts as contact
bounce and is ignored, so the behaviour is the same on every backend.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from device.config import TriggerConfig
from device.errors import LeukoCamError

log = logging.getLogger(__name__)

STATES = ("idle", "busy", "done", "decided", "retake", "error", "refused")
"""What `Trigger.set_state` accepts; see its docstring for the LED/buzzer pattern of each."""
DONE_FRESH_S = 300.0
"""After a stored result the LED stays on (solid) this long at most, unless the next capture starts first: an
operator who looks up from the eyepieces after moving the stage still sees it, and a light left on over lunch
does not claim that an old result is the one just taken."""

_PRESS = "press"
_LONG_PRESS = "long press"


class Trigger:
    """A push button (short press / long press) and an optional status LED and buzzer.

    Args:
        config: the [trigger] section; pin 0 for the LED or buzzer means not fitted.
        on_press: called on the Trigger's worker thread after a short press.
        on_long_press: called on the worker thread once the button has been held `long_press_s`.
        pin_factory: a gpiozero pin factory (tests pass a MockFactory); None = gpiozero's default,
            chosen by GPIOZERO_PIN_FACTORY or the first backend that loads.

    Raises:
        LeukoCamError: no GPIO backend could be loaded (not a Raspberry Pi), or a pin is taken.
    """

    def __init__(
        self, config: TriggerConfig, on_press: Callable[[], None], on_long_press: Callable[[], None], pin_factory=None
    ):
        self.config = config
        self._handlers = {_PRESS: on_press, _LONG_PRESS: on_long_press}
        self._events: queue.Queue[str] = queue.Queue(maxsize=4)
        self._lock = threading.Lock()  # guards the press bookkeeping across gpiozero's threads
        self._down_at: float | None = None
        self._held = False
        self._min_press_s = config.bounce_ms / 1000
        self._state_lock = threading.RLock()
        self._state = "idle"
        self._restore: threading.Timer | None = None
        self._expire: threading.Timer | None = None
        self._closed = False
        self.button = self.led = self.buzzer = None

        from gpiozero import LED, Button, Buzzer  # here, not at module level: see the docstring
        from gpiozero.exc import BadPinFactory, GPIOPinInUse

        try:
            self.button = Button(
                config.button_pin,
                pull_up=True,
                bounce_time=config.bounce_ms / 1000,
                hold_time=config.long_press_s,
                pin_factory=pin_factory,
            )
            if config.led_pin:
                self.led = LED(config.led_pin, pin_factory=pin_factory)
            if config.buzzer_pin:
                self.buzzer = Buzzer(config.buzzer_pin, pin_factory=pin_factory)
        except BadPinFactory as exc:
            self._close_devices()
            raise LeukoCamError(
                f"no GPIO here ({exc}): set [trigger] enabled = false, or run on a Raspberry Pi "
                f"(with python3-lgpio installed)"
            ) from None
        except GPIOPinInUse as exc:
            self._close_devices()
            raise LeukoCamError(
                f"[trigger] pins: {exc}; choose free BCM pins for button_pin, led_pin and buzzer_pin"
            ) from None
        except BaseException:
            self._close_devices()
            raise
        factory = type(self.button.pin_factory).__name__
        if pin_factory is None and factory == "MockFactory":
            log.warning("trigger: GPIOZERO_PIN_FACTORY selects mock pins; the button cannot be pressed")
        log.info(
            "trigger: button GPIO%d, LED %s, buzzer %s (%s)",
            config.button_pin,
            f"GPIO{config.led_pin}" if self.led else "none",
            f"GPIO{config.buzzer_pin}" if self.buzzer else "none",
            factory,
        )

        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="trigger-worker", daemon=True)
        self._worker.start()
        self.button.when_pressed = self._pressed
        self.button.when_held = self._held_down
        self.button.when_released = self._released

    # -- gpiozero's threads: classify and enqueue, nothing else -----------------------------
    def _pressed(self) -> None:
        with self._lock:
            self._down_at = time.monotonic()
            self._held = False

    def _held_down(self) -> None:
        with self._lock:
            if self._down_at is None or self._held:
                return  # a hold that raced the release, or a repeat
            self._held = True
        self._enqueue(_LONG_PRESS)

    def _released(self) -> None:
        with self._lock:
            if self._down_at is None:
                return
            down_s = time.monotonic() - self._down_at
            held, self._down_at = self._held, None
        if not held and down_s >= self._min_press_s:
            self._enqueue(_PRESS)

    def _enqueue(self, event: str) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            log.warning("trigger: %s dropped; the previous presses are still being handled", event)

    # -- the worker: runs the handlers --------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            if self._state == "error":
                self.set_state("idle")  # the error pattern lasts until the next press
            try:
                self._handlers[event]()
            except Exception:  # a handler's bug must not stop the button
                log.exception("trigger: the %s handler failed", event)

    # -- feedback -----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The last persistent state set ("refused" is momentary and never shows here)."""
        return self._state

    def set_state(self, state: str) -> None:
        """Show a state on the LED (and buzzer, where fitted). Safe from any thread.

        idle: LED off. busy: LED blinks fast. done: LED on (solid) while the stored result is the newest:
        until the next state (the next press) or DONE_FRESH_S, then off. retake: LED blinks slowly for 3 s,
        double beep, then off (nothing new was stored). error: LED blinks slowly until the next press.
        decided: the slide's guided count is complete (target reached, the CI on one side of the decision
        threshold): long on, short off, with three beeps, until the next press: the operator can stop counting.
        refused: a quick flash and a short buzz, then the busy or error blink (or the done light) resumes.
        """
        if state not in STATES:
            raise ValueError(f"trigger state {state!r}: expected one of {', '.join(STATES)}")
        with self._state_lock:
            if self._closed:
                return
            self._cancel_restore()
            if state == "refused":
                self._refused()
                return
            self._cancel_expire()
            self._state = state
            self._show(state)
            if state == "done":
                self._expire = threading.Timer(DONE_FRESH_S, self._expired)
                self._expire.args = (self._expire,)  # it knows itself: see _expired
                self._expire.daemon = True
                self._expire.start()

    def _show(self, state: str) -> None:
        led, buzzer = self.led, self.buzzer
        if buzzer is not None:
            buzzer.off()
        if state == "retake" and buzzer is not None:
            buzzer.beep(on_time=0.1, off_time=0.1, n=2)
        if state == "decided" and buzzer is not None:
            buzzer.beep(on_time=0.1, off_time=0.1, n=3)
        if led is None:
            return
        if state == "idle":
            led.off()
        elif state == "busy":
            led.blink(on_time=0.1, off_time=0.1)
        elif state == "done":
            led.on()  # stops a blink in progress, then solid
        elif state == "decided":
            led.blink(on_time=1.5, off_time=0.3)
        elif state == "retake":
            led.blink(on_time=0.5, off_time=0.5, n=3)
        elif state == "error":
            led.blink(on_time=0.5, off_time=0.5)

    def _refused(self) -> None:
        if self.buzzer is not None:
            self.buzzer.beep(on_time=0.3, off_time=0.0, n=1)
        if self.led is not None:
            self.led.blink(on_time=0.05, off_time=0.05, n=3)
        # Then resume an open-ended pattern (the busy blink, usually, or the done light); a retake just ends early.
        if self._state in ("busy", "error", "done", "decided"):
            self._restore = threading.Timer(0.35, self._resume, args=(self._state,))
            self._restore.daemon = True
            self._restore.start()

    def _resume(self, previous: str) -> None:
        with self._state_lock:
            if not self._closed and self._state == previous:
                self._show(previous)

    def _cancel_restore(self) -> None:
        if self._restore is not None:
            self._restore.cancel()
            self._restore = None

    def _expired(self, timer: threading.Timer) -> None:
        with self._state_lock:  # a timer replaced while it waited for the lock is stale
            if not self._closed and self._state == "done" and self._expire is timer:
                self._state = "idle"
                self._show("idle")

    def _cancel_expire(self) -> None:
        if self._expire is not None:
            self._expire.cancel()
            self._expire = None

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the pins (LED and buzzer off) and stop the worker. Safe to call twice."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._cancel_restore()
            self._cancel_expire()
        if self.button is not None:
            self.button.close()  # first: no new events
        self._stop.set()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(5.0)
            if self._worker.is_alive():
                log.warning("trigger: a handler is still running after 5 s; leaving it to finish")
        self._close_devices()

    def _close_devices(self) -> None:
        for device in (self.button, self.led, self.buzzer):
            if device is not None:
                device.close()

    def __enter__(self) -> Trigger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
