"""The button and status LED on gpiozero's mock pins, driven low and high with real (short) presses."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

gpiozero = pytest.importorskip("gpiozero")
from gpiozero.pins.mock import MockFactory  # noqa: E402

from device.config import TriggerConfig  # noqa: E402
from device.errors import BusyError, LeukoCamError  # noqa: E402
from device.trigger import Trigger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOLD_S = 0.3
BUTTON, LED, BUZZER = 17, 27, 22
CONFIG = TriggerConfig(enabled=True, button_pin=BUTTON, bounce_ms=5, long_press_s=HOLD_S, led_pin=LED, buzzer_pin=0)


@pytest.fixture
def factory():
    """A fresh mock pin factory per test; the global default is put back afterwards."""
    saved = gpiozero.Device.pin_factory
    mock = MockFactory()
    yield mock
    mock.reset()
    mock.close()
    gpiozero.Device.pin_factory = saved


class Recorder:
    """Counts the handler calls; each call runs `action` (if any) on the Trigger's worker."""

    def __init__(self, action=None):
        self.calls = 0
        self.threads: list[str] = []
        self.action = action

    def __call__(self) -> None:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if self.action is not None:
            self.action()


def wait_for(condition, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def press(pin, seconds: float) -> None:
    pin.drive_low()  # the button shorts the pulled-up pin to ground
    time.sleep(seconds)
    pin.drive_high()


def make(factory, config: TriggerConfig = CONFIG, on_press=None, on_long_press=None) -> Trigger:
    return Trigger(config, on_press or Recorder(), on_long_press or Recorder(), pin_factory=factory)


def toggles(pin) -> int:
    return len(pin.states) - 1


# -- presses ------------------------------------------------------------------------------------
def test_short_press_calls_on_press_once_on_the_worker(factory):
    short, long = Recorder(), Recorder()
    with make(factory, on_press=short, on_long_press=long):
        press(factory.pin(BUTTON), 0.05)
        assert wait_for(lambda: short.calls == 1)
        time.sleep(HOLD_S + 0.1)  # long enough for a wrong long press to show up
    assert (short.calls, long.calls) == (1, 0)
    assert short.threads == ["trigger-worker"]


def test_long_press_calls_on_long_press_once_while_held(factory):
    short, long = Recorder(), Recorder()
    with make(factory, on_press=short, on_long_press=long):
        pin = factory.pin(BUTTON)
        pin.drive_low()
        assert wait_for(lambda: long.calls == 1)  # fires at hold_time, before the release
        time.sleep(HOLD_S + 0.1)  # still down: no repeat
        pin.drive_high()
        time.sleep(0.1)
    assert (short.calls, long.calls) == (0, 1)


def test_bounce_gives_one_press_and_glitches_none(factory):
    short, long = Recorder(), Recorder()
    with make(factory, on_press=short, on_long_press=long):
        pin = factory.pin(BUTTON)
        for _ in range(5):  # contact bounce on the way down, far shorter than bounce_ms
            pin.drive_low()
            pin.drive_high()
        press(pin, 0.05)
        for _ in range(5):  # and on the way up
            pin.drive_low()
            pin.drive_high()
        assert wait_for(lambda: short.calls == 1)
        time.sleep(0.2)
    assert (short.calls, long.calls) == (1, 0)


def test_a_failing_handler_is_logged_and_the_next_press_works(factory, caplog):
    def fail_first():
        if handler.calls == 1:
            raise RuntimeError("handler bug")

    handler = Recorder(fail_first)
    with caplog.at_level(logging.ERROR, logger="device.trigger"), make(factory, on_press=handler):
        pin = factory.pin(BUTTON)
        press(pin, 0.05)
        assert wait_for(lambda: any("handler failed" in r.getMessage() for r in caplog.records))
        press(pin, 0.05)
        assert wait_for(lambda: handler.calls == 2)
    failure = next(r for r in caplog.records if "handler failed" in r.getMessage())
    assert failure.exc_info and "handler bug" in str(failure.exc_info[1])


def test_a_slow_handler_does_not_block_the_gpio_thread(factory):
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(2.0)  # stands in for a handler that takes its time

    handler = Recorder(slow)
    with make(factory, on_press=handler):
        pin = factory.pin(BUTTON)
        press(pin, 0.05)
        assert started.wait(2.0)
        press(pin, 0.05)  # mock pins call back on this thread: it would hang here if the handler ran on it
        assert handler.calls == 1 and not release.is_set()
        release.set()
        assert wait_for(lambda: handler.calls == 2)


# -- LED and buzzer -----------------------------------------------------------------------------
def test_led_states(factory):
    with make(factory) as trigger:
        led = factory.pin(LED)
        assert trigger.buzzer is None  # buzzer_pin = 0: not fitted
        assert led.state is False

        trigger.set_state("busy")
        assert wait_for(lambda: toggles(led) >= 4)  # blinking

        trigger.set_state("idle")
        assert led.state is False

        with pytest.raises(ValueError, match="expected one of"):
            trigger.set_state("party")


def test_done_stays_on_while_the_result_is_the_newest(factory):
    """Issue #13: a result is shown by a solid light that an operator at the eyepieces cannot miss, not a 2 s flash."""
    with make(factory) as trigger:
        led = factory.pin(LED)
        trigger.set_state("busy")
        assert wait_for(lambda: toggles(led) >= 2)
        trigger.set_state("done")
        assert wait_for(lambda: led.state is True)
        led.clear_states()
        time.sleep(2.3)  # past the old 2 s flash
        assert led.state is True and toggles(led) == 0  # solid: not one change
        assert trigger.state == "done"
        trigger.set_state("busy")  # the next press: the light gives way to the busy blink
        assert wait_for(lambda: toggles(led) >= 4)
        led.clear_states()
        trigger.set_state("retake")  # nothing new stored: three slow blinks, then dark
        assert wait_for(lambda: toggles(led) >= 5 and led.state is False, timeout=4.0)


def test_done_goes_dark_once_the_result_is_stale(factory, monkeypatch):
    monkeypatch.setattr("device.trigger.DONE_FRESH_S", 0.3)
    with make(factory) as trigger:
        led = factory.pin(LED)
        trigger.set_state("done")
        assert led.state is True
        assert wait_for(lambda: led.state is False and trigger.state == "idle")
        trigger.set_state("done")
        time.sleep(0.2)
        trigger.set_state("done")  # a second result restarts the clock: the first timer must not end it
        time.sleep(0.2)
        assert led.state is True
        assert wait_for(lambda: led.state is False)


def test_refused_during_done_flashes_then_the_light_comes_back(factory):
    with make(factory) as trigger:
        led = factory.pin(LED)
        trigger.set_state("done")
        led.clear_states()
        trigger.set_state("refused")
        assert wait_for(lambda: toggles(led) >= 4)  # the quick flash
        assert wait_for(lambda: led.state is True)  # then solid again
        assert trigger.state == "done"


def test_retake_blinks_and_double_beeps(factory):
    config = TriggerConfig(
        enabled=True, button_pin=BUTTON, bounce_ms=5, long_press_s=HOLD_S, led_pin=LED, buzzer_pin=BUZZER
    )
    with make(factory, config) as trigger:
        led, buzzer = factory.pin(LED), factory.pin(BUZZER)
        trigger.set_state("retake")
        assert wait_for(lambda: toggles(buzzer) == 4 and buzzer.state is False)  # two beeps
        assert wait_for(lambda: toggles(led) >= 2)


def test_error_blinks_until_the_next_press(factory):
    with make(factory) as trigger:
        led = factory.pin(LED)
        trigger.set_state("error")
        assert wait_for(lambda: toggles(led) >= 2)
        press(factory.pin(BUTTON), 0.05)
        assert wait_for(lambda: trigger.state == "idle")
        assert led.state is False


def test_refused_flashes_then_busy_resumes(factory):
    config = TriggerConfig(
        enabled=True, button_pin=BUTTON, bounce_ms=5, long_press_s=HOLD_S, led_pin=LED, buzzer_pin=BUZZER
    )
    with make(factory, config) as trigger:
        led, buzzer = factory.pin(LED), factory.pin(BUZZER)
        trigger.set_state("busy")
        trigger.set_state("refused")
        assert wait_for(lambda: toggles(buzzer) >= 2)  # a short buzz
        assert trigger.state == "busy"
        led.clear_states()
        assert wait_for(lambda: toggles(led) >= 4)  # blinking again


def test_no_led_and_no_buzzer(factory):
    config = TriggerConfig(enabled=True, button_pin=BUTTON, bounce_ms=5, long_press_s=HOLD_S, led_pin=0, buzzer_pin=0)
    with make(factory, config) as trigger:
        assert trigger.led is None and trigger.buzzer is None
        for state in ("busy", "refused", "done", "retake", "error", "idle"):
            trigger.set_state(state)


# -- lifecycle ----------------------------------------------------------------------------------
def test_close_releases_the_pins_and_stops_the_worker(factory):
    trigger = make(factory)
    trigger.set_state("busy")
    trigger.close()
    trigger.close()  # twice is fine
    assert not trigger._worker.is_alive()
    trigger.set_state("done")  # after close: ignored
    again = make(factory)  # same pins: would raise if anything were still reserved
    again.close()


def test_a_pin_in_use_is_a_clear_error_and_leaks_nothing(factory):
    first = make(factory)
    clash = TriggerConfig(enabled=True, button_pin=BUZZER, bounce_ms=5, long_press_s=HOLD_S, led_pin=LED, buzzer_pin=0)
    with pytest.raises(LeukoCamError, match="pins"):
        make(factory, clash)  # the button on GPIO22 is made, then the LED on GPIO27 clashes
    first.close()
    make(factory, clash).close()  # GPIO22 was released when the clash was found


def test_no_gpio_backend_says_what_to_do(monkeypatch):
    from gpiozero.exc import BadPinFactory

    def no_backend():
        raise BadPinFactory("Unable to load any default pin factory!")

    monkeypatch.setattr(gpiozero.Device, "pin_factory", None)
    monkeypatch.setattr(gpiozero.Device, "_default_pin_factory", staticmethod(no_backend))
    with pytest.raises(LeukoCamError, match=r"no GPIO here .*enabled = false.*Raspberry Pi"):
        Trigger(CONFIG, Recorder(), Recorder())


def test_importing_the_module_needs_no_gpiozero():
    code = "import sys; sys.modules['gpiozero'] = None; import device.trigger; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- the glue the Appliance uses ----------------------------------------------------------------
class FakeService:
    """The Appliance's side of the wiring: request_capture refuses while busy."""

    def __init__(self):
        self.busy = False
        self.requests: list[str] = []
        self.slides = 0
        self.trigger: Trigger | None = None

    def request_capture(self, trigger: str = "web") -> None:
        if self.busy:
            raise BusyError("a capture is already in progress; wait for its result, then press again")
        self.requests.append(trigger)
        self.busy = True

    def new_slide(self) -> None:
        self.slides += 1

    # The lines proposed for Appliance:
    def _button_pressed(self) -> None:
        try:
            self.request_capture("button")
        except BusyError:
            self.trigger.set_state("refused")

    def _button_held(self) -> None:
        if self.busy:
            self.trigger.set_state("refused")
            return
        self.new_slide()
        self.trigger.set_state("done")


def test_wiring_press_captures_and_a_press_while_busy_is_refused(factory):
    config = TriggerConfig(
        enabled=True, button_pin=BUTTON, bounce_ms=5, long_press_s=HOLD_S, led_pin=LED, buzzer_pin=BUZZER
    )
    service = FakeService()
    service.trigger = Trigger(config, service._button_pressed, service._button_held, pin_factory=factory)
    with service.trigger:
        button, buzzer = factory.pin(BUTTON), factory.pin(BUZZER)
        press(button, 0.05)
        assert wait_for(lambda: service.requests == ["button"])
        assert toggles(buzzer) == 0

        press(button, 0.05)  # still busy
        assert wait_for(lambda: toggles(buzzer) >= 2)  # refused: a short buzz
        assert service.requests == ["button"]

        service.busy = False
        button.drive_low()
        assert wait_for(lambda: service.slides == 1)  # long press: a new slide
        button.drive_high()
        assert service.requests == ["button"]


def test_a_complete_count_has_its_own_led_pattern_until_the_next_press():
    """The guided count's end is shown at the eyepiece: long on, short off (not the solid 'stored' light)."""
    import time

    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    from device.config import TriggerConfig
    from device.trigger import Trigger

    Device.pin_factory = MockFactory()
    trig = Trigger(TriggerConfig(enabled=True), lambda: None, lambda: None)
    try:
        trig.set_state("decided")
        assert trig.state == "decided"
        led = trig.led
        seen = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and len(seen) < 2:
            seen.add(bool(led.value))
            time.sleep(0.05)
        assert seen == {True, False}  # it blinks (a solid light would only ever be on)
        trig.set_state("busy")  # the next press
        assert trig.state == "busy"
    finally:
        trig.close()
        Device.pin_factory = None
