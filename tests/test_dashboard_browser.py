"""The dashboard a lab uses every day, in Debian's Chromium at phone (390 px) and desktop (1366 px) width.

Every page: no horizontal scrolling, the SYNTHETIC banner visible, text contrast at least WCAG AA (4.5:1)
for the banner, the header, warnings and the cell numbers on the field. Then the guided count updating
after a capture, the evidence overlay's legend and toggle, the field's zoom, card colours following the
reviewer's verdict, the refusal to mark a slide reviewed with cells unreviewed unless confirmed with the
count, and the printable report. Screenshots: artifacts/screenshots/dashboard-*.png.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.test_browser import ARGS, CHROMIUM, PASSWORD, SHOTS, server  # noqa: F401 (the fixture)

WIDTHS = {"phone": (390, 844), "desktop": (1366, 900)}
PAGES = ["/", "/captures", "/captures/1", "/slides", "/slides/{slide}", "/status", "/upload"]

# Contrast of an element's text against the first opaque background behind it (WCAG 2 relative luminance).
CONTRAST_JS = """
(el) => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const style = getComputedStyle(el);
  let fg = rgb(el instanceof SVGElement ? style.fill : style.color);
  let bg = null;
  if (el.dataset.bg) bg = rgb(getComputedStyle(document.querySelector(el.dataset.bg)).fill);
  for (let n = el; !bg && n; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.length === 3 || (c.length === 4 && c[3] > 0.99)) bg = c.slice(0, 3);
  }
  bg = bg || [255, 255, 255];
  const [a, b] = [lum(fg.slice(0, 3)), lum(bg)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}
"""
TEXT_CHECKED = ["#synthetic-banner", "header a.brand", "header .tag", ".warn", ".decision", "button", ".hint"]


def _browser(p):
    return p.chromium.launch(
        executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"), args=ARGS
    )


def _login(page, base):
    page.goto(base + "/login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("#login")


def _check_page(page, name: str, width: str) -> list[str]:
    """Problems on the current page: horizontal overflow, no banner, low contrast."""
    problems = []
    scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    if scroll > inner:
        problems.append(f"{name} @{width}: {scroll} px wide on a {inner} px screen")
    if not page.locator("#synthetic-banner").is_visible():
        problems.append(f"{name} @{width}: no SYNTHETIC banner")
    for selector in TEXT_CHECKED:
        for el in page.locator(selector).all()[:5]:
            if el.is_visible():
                ratio = el.evaluate(CONTRAST_JS)
                if ratio < 4.5:
                    problems.append(f"{name} @{width}: {selector} contrast {ratio:.2f} < 4.5")
    for label in page.locator("svg.boxes text").all()[:5]:
        label.evaluate("(t) => { t.dataset.bg = 'svg.boxes rect.label'; }")
        ratio = label.evaluate(CONTRAST_JS)
        if ratio < 4.5:
            problems.append(f"{name} @{width}: cell number contrast {ratio:.2f} < 4.5")
    return problems


@pytest.mark.parametrize("width", list(WIDTHS))
def test_every_page_fits_shows_the_banner_and_reads_clearly(server, width):  # noqa: F811
    from playwright.sync_api import sync_playwright

    appliance, base = server
    appliance.capture_now("test")
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = _browser(p)
        w, h = WIDTHS[width]
        page = browser.new_context(viewport={"width": w, "height": h}).new_page()
        page.goto(base + "/login")
        problems += _check_page(page, "login", width)
        _login(page, base)
        for path in PAGES:
            page.goto(base + path.format(slide=appliance.slide_id))
            page.wait_for_load_state("networkidle")
            name = path.strip("/").replace("/", "-").replace("{slide}", "slide") or "live"
            problems += _check_page(page, name, width)
            page.screenshot(path=str(SHOTS / f"dashboard-{width}-{name.replace('1', 'one')}.png"), full_page=True)
        # each cell card says SYNTHETIC too
        page.goto(base + "/captures/1")
        cards = page.locator("#review-cells figure.cell")
        assert cards.count() > 0 and cards.locator(".synthetic-tag").count() == cards.count()
        browser.close()
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("width", list(WIDTHS))
def test_guided_count_review_safety_overlay_and_print(server, width):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    appliance, base = server
    slide = appliance.slide_id
    with sync_playwright() as p:
        browser = _browser(p)
        w, h = WIDTHS[width]
        page = browser.new_context(viewport={"width": w, "height": h}).new_page()
        page.set_default_timeout(30_000)
        _login(page, base)
        expect(page.locator("#progress")).to_contain_text(f"0 of {appliance.config.slides.target_cells}")
        expect(page.locator("#decision")).to_contain_text("keep counting")
        page.click("#capture")
        expect(page.locator("#latest h2")).to_contain_text("Capture", timeout=60_000)
        cells = len(appliance.store.slide_cells(slide))
        expect(page.locator("#counted")).to_have_text(str(cells), timeout=20_000)  # updated with the result
        page.screenshot(path=str(SHOTS / f"dashboard-{width}-live-progress.png"), full_page=True)
        # The replay camera has three sample fields: a fourth capture repeats the first, and its cells are
        # recognised and counted once.
        for n in range(2, 5):
            expect(page.locator("#capture")).to_be_enabled(timeout=60_000)
            page.click("#capture")
            expect(page.locator("#latest h2")).to_contain_text(f"Capture {n}", timeout=60_000)
        once = len(appliance.store.slide_cells(slide))
        assert once < len(appliance.store.slide_cells(slide, include_duplicates=True))
        expect(page.locator("#counted")).to_have_text(str(once), timeout=20_000)

        # Capture page: the overlay legend and toggle, the zoom, and colours that follow the verdict.
        cap_id = appliance.store.recent_captures(limit=1)[0]["id"]
        page.goto(f"{base}/captures/{cap_id}")
        expect(page.locator("#legend")).to_contain_text("red = for blast")
        heat = page.locator("#review-cells img.heatmap").first
        expect(heat).to_be_visible()
        page.click("#overlay-toggle")
        expect(heat).to_be_hidden()
        page.click("#overlay-toggle")
        expect(heat).to_be_visible()
        page.click("#zoom")  # full size, scrolling inside its box: the page itself stays as wide as the screen
        wide = page.evaluate("document.querySelector('#field-scroll .field-wrap').getBoundingClientRect().width")
        assert wide == appliance.store.get_capture(cap_id)["width"]
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.click("#zoom")
        first = appliance.store.get_capture(cap_id)["cells"][0]
        other = "normal" if first["label"] == "blast" else "blast"
        fig = page.locator(f"#cell-{first['id']}")
        fig.click()
        page.keyboard.press(other[0])
        expect(fig).to_have_class(re.compile(rf"\b{other}\b"))
        assert f"box {other}" in page.locator(f"#box-{first['id']}").get_attribute("class")
        expect(page.locator("#history tbody tr").last).to_contain_text(f"#{first['idx']}")

        # "to review" goes down once a flagged cell has been reviewed
        page.goto(f"{base}/slides/{slide}")
        before = appliance.store.slide_summary(slide)["needs_review"]
        flagged = [c for c in appliance.store.slide_cells(slide) if c["needs_review"] and not c["reviewed_label"]]
        if flagged:
            appliance.store.add_review(flagged[0]["cell_id"], "blast", "alice")
            page.reload()
            expect(page.locator("#pending")).to_contain_text(f"{before - 1} flagged by the model and not yet reviewed")

        # Slide report: refused while cells are unreviewed, unless confirmed with the count.
        page.goto(f"{base}/slides/{slide}")
        unreviewed = sum(c["reviewed_label"] is None for c in appliance.store.slide_cells(slide))
        expect(page.locator("#unreviewed-warning")).to_contain_text(f"{unreviewed} cell(s)")
        page.click("#mark-reviewed")  # the confirmation box is required: nothing happens
        assert appliance.store.slide_summary(slide)["reviewed_at"] is None
        page.check("#confirm-unreviewed")
        page.click("#mark-reviewed")
        expect(page.locator("#review-state")).to_contain_text("by alice")
        page.emulate_media(media="print")
        expect(page.locator("#synthetic-banner")).to_be_visible()
        expect(page.locator("#decision")).to_be_visible()
        assert not page.locator("#mark-reviewed").is_visible()
        page.screenshot(path=str(SHOTS / f"dashboard-{width}-slide-print.png"), full_page=True)
        browser.close()
