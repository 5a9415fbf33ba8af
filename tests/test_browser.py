"""The dashboard in a real browser (Debian's Chromium driven by Playwright) over a real waitress server.

Logs in (login forced on), presses Capture and waits for polling to show the result,
reviews a cell with the keyboard, marks the slide reviewed and exports the dataset.
Screenshots go to artifacts/screenshots/. In CI a missing browser fails; locally it skips.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from device import accounts as auth
from device.service import Appliance
from device.web import create_app
from tests.conftest import REPO

CHROMIUM = os.environ.get("LEUKOCAM_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "artifacts" / "screenshots"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PASSWORD = "correct horse battery"


def _need_browser():
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing is None and not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {missing}")
        pytest.skip(missing)


@pytest.fixture
def server(config):
    _need_browser()
    from waitress import create_server

    with Appliance(config) as appliance:
        auth.set_password(appliance.store.data_dir, "alice", PASSWORD)
        app = create_app(appliance, login_required=True)
        srv = create_server(app, host="127.0.0.1", port=0, threads=4)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        appliance.start()
        try:
            yield appliance, f"http://127.0.0.1:{srv.effective_port}"
        finally:
            srv.close()
            thread.join(10)


def test_capture_review_and_export_in_a_browser(server):
    from playwright.sync_api import expect, sync_playwright

    appliance, base = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"), args=ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.set_default_timeout(20_000)

        # Not logged in: the gate sends us to the login page; a wrong password is refused.
        page.goto(base + "/")
        expect(page).to_have_url(f"{base}/login?next=/")
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", "wrong password")
        page.click("#login")
        expect(page.locator("#login-error")).to_contain_text("wrong user name or password")
        page.screenshot(path=str(SHOTS / "01-login.png"))
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("#login")
        expect(page).to_have_url(base + "/")
        expect(page.locator("#latest")).to_contain_text("No captures yet")

        # Capture: the button posts with fetch; polling swaps the new result in without a reload.
        page.click("#capture")
        expect(page.locator("#latest h2")).to_contain_text("Capture 1", timeout=60_000)
        expect(page.locator("#latest figure.cell").first).to_be_visible()
        expect(page.locator("#capture")).to_be_enabled(timeout=30_000)
        page.screenshot(path=str(SHOTS / "02-live-after-capture.png"), full_page=True)

        # Capture page: boxes over the field; review the first cell with the keyboard.
        page.click("#latest h2 a")
        expect(page).to_have_url(re.compile(re.escape(base) + r"/captures/1(#cell-\d+)?$"))
        cap = appliance.store.get_capture(1)
        expect(page.locator("svg.boxes rect.box")).to_have_count(len(cap["cells"]))
        first = cap["cells"][0]
        other = "normal" if first["label"] == "blast" else "blast"
        fig = page.locator(f"#cell-{first['id']}")
        expect(fig).to_have_class(re.compile(r"\bselected\b"))
        page.keyboard.press("j")
        page.keyboard.press("k")  # back to the first cell
        page.keyboard.press(other[0])  # b = blast, n = normal
        expect(fig.locator(".verdict")).to_contain_text(f"reviewed: {other} by alice")
        expect(page.locator("#history tbody tr")).to_have_count(1)
        page.screenshot(path=str(SHOTS / "03-capture-reviewed.png"), full_page=True)
        history = appliance.store.review_history(cell_id=first["id"])
        assert [(r["label"], r["reviewer"], r["action"]) for r in history] == [(other, "alice", "reclassify")]

        # Slide report: mark reviewed; who and when are shown.
        page.click(f"a[href='/slides/{cap['slide_id']}']")
        page.check("#confirm-unreviewed")  # the other cells are not reviewed: the page asks, naming the count
        page.click("#mark-reviewed")
        expect(page.locator("#review-state")).to_contain_text("by alice")
        page.emulate_media(media="print")
        page.screenshot(path=str(SHOTS / "04-slide-report-print.png"), full_page=True)
        assert not page.locator("#mark-reviewed").is_visible()  # forms are hidden when printed
        page.emulate_media(media="screen")

        # Export: a download whose zip holds the reviewer's label, not the model's.
        with page.expect_download() as info:
            page.click("#export")
        data = Path(info.value.path()).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
            manifest = zf.read("manifest.csv").decode()
        cls = {"blast": "all", "normal": "hem"}[other]
        assert f"cells/{cls}/UID_1_1_{first['id']}_{cls}.bmp" in names and "README.txt" in names
        assert f",{other}," in manifest and "alice" in manifest

        # A phone-sized look at the status page.
        phone = context.new_page()
        phone.set_viewport_size({"width": 390, "height": 844})
        phone.goto(base + "/status")
        expect(phone.locator("#self-test")).to_contain_text("passed")
        phone.screenshot(path=str(SHOTS / "05-status-phone.png"), full_page=True)
        browser.close()
    assert not [m for m in problems if "Content Security Policy" in m or "Uncaught" in m], problems
