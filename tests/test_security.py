"""Login gate, CSRF, rate limits, cookie flags, accounts on disk, and bad input that must not hurt the server."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat

import pytest

from device import accounts as auth
from device.errors import InputError
from device.imaging import encode_image
from device.service import Appliance
from device.web import create_app

PASSWORD = "correct horse battery"


def token_of(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


@pytest.fixture
def secured(config):
    """An app with the login gate forced on and one account, plus a fresh (logged-out) client."""
    with Appliance(config) as appliance:
        appliance.capture_now("test")
        auth.set_password(appliance.store.data_dir, "alice", PASSWORD)
        app = create_app(appliance, login_required=True)
        yield appliance, app, app.test_client()


def login(client, password=PASSWORD, user="alice"):
    tok = token_of(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": user, "password": password, "csrf_token": tok, "next": "/status"})


def test_login_required_follows_the_listen_address(config):
    assert not auth.login_required_for("127.0.0.1") and not auth.login_required_for("localhost")
    assert not auth.login_required_for("::1")
    assert auth.login_required_for("0.0.0.0") and auth.login_required_for("192.168.1.20")
    wide = dataclasses.replace(config, web=dataclasses.replace(config.web, host="0.0.0.0"))
    with Appliance(wide) as appliance:
        assert create_app(appliance).config["LEUKOCAM_LOGIN_REQUIRED"] is True
    with Appliance(config) as appliance:
        assert create_app(appliance).config["LEUKOCAM_LOGIN_REQUIRED"] is False


def test_password_file_is_hashed_private_and_checked(tmp_path):
    path = auth.set_password(tmp_path, "alice", PASSWORD)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert PASSWORD not in text and json.loads(text)["users"]["alice"].startswith("scrypt:")
    assert auth.verify(tmp_path, "alice", PASSWORD)
    assert not auth.verify(tmp_path, "alice", "wrong password")
    assert not auth.verify(tmp_path, "mallory", PASSWORD)
    with pytest.raises(auth.AuthError, match="too short"):
        auth.set_password(tmp_path, "bob", "short")
    with pytest.raises(auth.AuthError, match="user name"):
        auth.set_password(tmp_path, "bad name!", PASSWORD)
    path.write_text("{not json")
    with pytest.raises(auth.AuthError, match="unreadable"):
        auth.load_users(tmp_path)


def test_gate_redirects_pages_and_refuses_api(secured):
    _, _, client = secured
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    resp = client.get("/captures/1", headers=browser)
    assert resp.status_code == 302 and "/login?next=/captures/1" in resp.headers["Location"]
    resp = client.get("/api/captures")
    assert resp.status_code == 401 and "login required" in resp.get_json()["error"]
    # a script or an <img> (no text/html in Accept) is told, not sent to a form
    for path in ("/captures/1", "/images/field/1"):
        resp = client.get(path, headers={"Accept": "image/avif,image/webp,*/*;q=0.8"})
        assert resp.status_code == 401 and resp.get_json() == {"error": resp.get_json()["error"], "status": 401}
    assert client.post("/api/capture").status_code == 401
    assert client.get("/api/health").status_code in (200, 503)  # liveness stays public
    assert client.get("/api/openapi.json").status_code == 200


def test_login_logout_and_cookie_flags(secured):
    _, _, client = secured
    bad = login(client, password="nope nope nope")
    assert bad.status_code == 401 and "wrong user name or password" in bad.get_data(as_text=True)
    ok = login(client)
    assert ok.status_code == 302 and ok.headers["Location"] == "/status"
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    page = client.get("/captures/1").get_data(as_text=True)
    assert "Provenance" in page and "alice" in page
    tok = token_of(page)
    assert client.post("/logout", data={"csrf_token": tok}).status_code == 302
    assert client.get("/api/captures").status_code == 401


def test_secure_cookie_is_configurable(config):
    with Appliance(config) as appliance:
        auth.set_password(appliance.store.data_dir, "alice", PASSWORD)
        client = create_app(appliance, login_required=True, secure_cookies=True).test_client()
        resp = login(client)
        assert "Secure" in resp.headers["Set-Cookie"]


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/x",
        "/\t/evil.example",  # what /login?next=/%09/evil.example decodes to: browsers drop the tab
        "/\n/x",  # was a 500 (a newline in the Location header)
        "/\r\n/x",
        "/\\evil.example",
        "\\\\evil.example",
        "https://evil.example/",
        "javascript:alert(1)",
        "/ /evil.example",
        "/\x00/x",
        "",
        "/" + "a" * 5000,
    ],
)
def test_open_redirect_after_login_is_refused(secured, target):
    _, _, client = secured
    tok = token_of(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": tok, "next": target})
    assert resp.status_code == 302 and resp.headers["Location"] == "/"


def test_same_site_next_is_kept_after_login(secured):
    _, _, client = secured
    tok = token_of(client.get("/login").get_data(as_text=True))
    target = "/captures?slide=S1&label=blast"
    resp = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": tok, "next": target})
    assert resp.headers["Location"] == target


def test_logout_ends_the_session_on_the_server(secured):
    """A copy of the cookie taken before logout is worthless afterwards (it used to still read and write)."""
    _, app, client = secured
    login(client)
    cookie = client.get_cookie("leukocam_session").value
    tok = token_of(client.get("/status").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": tok}).status_code == 302
    thief = app.test_client()
    thief.set_cookie("leukocam_session", cookie)
    assert thief.get("/api/status").status_code == 401
    assert thief.post("/api/slides", json={"id": "S-stolen"}, headers={"X-CSRFToken": tok}).status_code == 401
    assert thief.get_cookie("leukocam_session") is None or "sid" not in thief.get_cookie("leukocam_session").value


def test_login_rotates_the_session_and_sessions_expire(secured, monkeypatch):
    _, app, client = secured
    from device.web import sessions

    client.get("/login")
    before = client.get_cookie("leukocam_session")
    login(client)
    first = client.get_cookie("leukocam_session").value
    assert before is None or before.value != first
    login(client)  # logging in again makes a new session; the old token stops working
    second = client.get_cookie("leukocam_session").value
    assert second != first
    old = app.test_client()
    old.set_cookie("leukocam_session", first)
    assert old.get("/api/status").status_code == 401
    assert client.get("/api/status").status_code == 200
    now = sessions.time.time()
    monkeypatch.setattr(sessions.time, "time", lambda: now + sessions.IDLE_S + 1)
    assert client.get("/api/status").status_code == 401  # idle too long
    monkeypatch.setattr(sessions.time, "time", lambda: now)
    login(client)
    for step in range(1, 14):  # active all shift long, but a login lasts MAX_AGE_S at most
        monkeypatch.setattr(sessions.time, "time", lambda s=step: now + s * 3600)
        code = client.get("/api/status").status_code
        assert code == (200 if step * 3600 <= sessions.MAX_AGE_S else 401), step


def test_the_signing_key_persists_so_a_restart_keeps_people_logged_in(secured):
    appliance, _, client = secured
    login(client)
    key_file = appliance.store.data_dir / "session_key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(appliance.store.data_dir / "sessions.sqlite3").st_mode) == 0o600
    restarted = create_app(appliance, login_required=True).test_client()  # a new process would read the same key
    restarted.set_cookie("leukocam_session", client.get_cookie("leukocam_session").value)
    assert restarted.get("/api/status").status_code == 200
    token = client.get_cookie("leukocam_session").value
    assert token not in (appliance.store.data_dir / "sessions.sqlite3").read_bytes().decode("latin-1")


def test_unknown_and_known_users_cost_the_same_password_work(tmp_path, monkeypatch):
    """User names could be guessed from timing (0.45 s unknown vs 0.2 s known): count the scrypt checks."""
    auth.set_password(tmp_path, "alice", PASSWORD)
    auth.decoy_hash()
    calls = {"hash": 0, "check": 0}
    real_check, real_hash = auth.check_password_hash, auth.generate_password_hash

    def check(*a):
        calls["check"] += 1
        return real_check(*a)

    def make(*a, **k):
        calls["hash"] += 1
        return real_hash(*a, **k)

    monkeypatch.setattr(auth, "check_password_hash", check)
    monkeypatch.setattr(auth, "generate_password_hash", make)
    work = []
    for user in ("alice", "mallory", "alice", "nobody-at-all"):
        calls.update(hash=0, check=0)
        assert not auth.verify(tmp_path, user, "wrong password")
        work.append(dict(calls))
    assert work == [{"hash": 0, "check": 1}] * 4
    assert auth.verify(tmp_path, "alice", PASSWORD)


def test_public_health_says_only_ok_until_logged_in(secured):
    appliance, _, client = secured
    anon = client.get("/api/health")  # (the fixture's worker is not started: not ok, 503)
    assert anon.status_code == 503 and anon.get_json() == {"ok": False}
    text = anon.get_data(as_text=True)
    assert appliance.slide_id not in text and "bundle" not in text and "path" not in text
    login(client)
    full = client.get("/api/health").get_json()
    assert full["slide_id"] == appliance.slide_id and full["model"]["path"]
    # an error page for a logged-out visitor carries no status either
    page = create_app(appliance, login_required=True).test_client().get("/login?next=x")
    assert appliance.slide_id not in page.get_data(as_text=True)


def test_results_and_images_are_never_cached_by_others(secured, config):
    _, _, client = secured
    login(client)
    for path in ("/api/captures", "/captures/1", "/api/slides", "/images/field/1", "/images/crop/1"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["Cache-Control"] == "private, no-store", path
    with Appliance(config) as appliance:
        appliance.capture_now("test")
        local = create_app(appliance).test_client()  # loopback only, no login: the browser may keep images
        assert local.get("/images/crop/1").headers["Cache-Control"] == "private, max-age=3600"
        assert local.get("/api/captures").headers["Cache-Control"] == "private, no-store"
        assert "public" not in local.get("/images/field/1").headers["Cache-Control"]


def test_loopback_mode_refuses_foreign_host_names(config):
    """DNS rebinding: evil.example resolved to 127.0.0.1 must get no CSRF token and no API."""
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example", "10.0.0.5"):
            resp = client.get("/api/csrf", headers={"Host": host})
            assert resp.status_code == 400 and "not a name this appliance answers to" in resp.get_json()["error"]
            assert "csrf_token" not in resp.get_data(as_text=True)
            assert client.post("/api/slides", json={"id": "S-rebound"}, headers={"Host": host}).status_code == 400
        for host in ("127.0.0.1:8080", "localhost:8080", "localhost", "[::1]:8080", "127.0.0.2"):
            assert client.get("/api/csrf", headers={"Host": host}).status_code == 200, host
        assert appliance.store.slide_summary("S-rebound") is None


def test_csrf_missing_or_wrong_is_refused_with_a_reason(secured):
    appliance, _, client = secured
    login(client)
    tok = token_of(client.get("/").get_data(as_text=True))
    missing = client.post("/api/capture")
    assert missing.status_code == 403 and "CSRF token is missing" in missing.get_json()["error"]
    wrong = client.post("/api/capture", headers={"X-CSRFToken": "forged"})
    assert wrong.status_code == 403 and "forged" in wrong.get_json()["error"]
    page = client.post("/slides", data={"id": "EVIL"})
    assert page.status_code == 403 and "forged or expired request" in page.get_data(as_text=True)
    assert appliance.slide_id != "EVIL"
    cell = appliance.store.get_capture(1)["cells"][0]["id"]
    assert client.post(f"/api/cells/{cell}/review", json={"label": "blast"}).status_code == 403
    assert appliance.store.review_history(cell_id=cell) == []
    # With the token: works, and the reviewer is the logged-in user whatever the body says.
    ok = client.post(
        f"/api/cells/{cell}/review", json={"label": "blast", "reviewer": "mallory"}, headers={"X-CSRFToken": tok}
    )
    assert ok.status_code == 201 and ok.get_json()["reviewer"] == "alice"
    assert client.post("/api/capture", headers={"X-CSRFToken": tok}).status_code == 202


def test_token_from_another_session_is_refused(secured):
    _, app, client = secured
    login(client)
    other = app.test_client()
    login(other)
    their_token = token_of(other.get("/").get_data(as_text=True))
    resp = client.post("/api/capture", headers={"X-CSRFToken": their_token})
    assert resp.status_code == 403


def test_api_client_flow_without_a_browser(secured):
    _, _, client = secured
    tok = client.get("/api/csrf").get_json()["csrf_token"]
    resp = client.post("/login", json={"username": "alice", "password": PASSWORD}, headers={"X-CSRFToken": tok})
    assert resp.status_code == 200
    tok = resp.get_json()["csrf_token"]
    assert client.get("/api/captures").status_code == 200
    assert client.post("/api/slides", json={"id": "S-API"}, headers={"X-CSRFToken": tok}).status_code == 201


def test_logins_are_rate_limited(secured):
    _, _, client = secured
    codes = [login(client, password="wrong password").status_code for _ in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] == 429
    assert "too many login attempts" in login(client).get_data(as_text=True)  # even the right password, for now
    assert client.get("/login").status_code == 200  # only POST is limited


def test_localhost_mode_checks_browsers_but_not_scripts(config):
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        # A page elsewhere posting at the appliance: browsers always send Origin on POST.
        forged = client.post("/api/capture", headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        # A local script (`leukocam capture`) sends no Origin and has no cookie: allowed.
        assert client.post("/api/capture", json={"trigger": "cli"}).status_code == 202


@pytest.mark.parametrize(
    "payload,name",
    [
        (b"", "empty.jpg"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 truncated", "trunc.jpg"),
        (b"%PDF-1.4 not an image", "doc.pdf"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt.png"),
    ],
)
def test_bad_uploads_are_4xx_and_the_server_keeps_serving(secured, payload, name):
    _, _, client = secured
    login(client)
    tok = token_of(client.get("/upload").get_data(as_text=True))
    api = client.post(
        "/api/upload",
        data={"image": (io.BytesIO(payload), name)},
        headers={"X-CSRFToken": tok},
        content_type="multipart/form-data",
    )
    assert api.status_code == 400 and api.get_json()["error"]
    page = client.post(
        "/upload", data={"image": (io.BytesIO(payload), name), "csrf_token": tok}, content_type="multipart/form-data"
    )
    assert page.status_code == 400 and name in page.get_data(as_text=True)
    assert client.get("/api/captures").status_code == 200


def test_huge_and_missing_uploads(config):
    cfg = dataclasses.replace(config, web=dataclasses.replace(config.web, max_upload_mb=1))
    with Appliance(cfg) as appliance:
        client = create_app(appliance).test_client()
        tok = token_of(client.get("/upload").get_data(as_text=True))
        big = client.post(
            "/upload",
            data={"image": (io.BytesIO(b"0" * 2_000_000), "big.jpg"), "csrf_token": tok},
            content_type="multipart/form-data",
        )
        assert big.status_code == 413
        assert client.post("/upload", data={"csrf_token": tok}, content_type="multipart/form-data").status_code == 400
        good = encode_image(appliance.bundle.golden.crops[0], "PNG")
        ok = client.post(
            "/upload",
            data={"image": (io.BytesIO(good), "c.png"), "single_cell": "1", "csrf_token": tok},
            content_type="multipart/form-data",
        )
        assert ok.status_code == 302 and "/captures/" in ok.headers["Location"]


def test_unknown_ids_and_methods(secured):
    _, _, client = secured
    login(client)
    for path in ("/captures/999", "/slides/NOPE", "/images/crop/999", "/no/such/page"):
        resp = client.get(path)
        assert resp.status_code == 404 and "<html" in resp.get_data(as_text=True)
    for path in ("/api/captures/999", "/api/cells/999", "/api/slides/NOPE", "/api/nothing"):
        resp = client.get(path)
        assert resp.status_code == 404 and resp.get_json()["error"]
    resp = client.get("/api/capture")
    assert resp.status_code == 405 and resp.get_json()["error"] and resp.headers["Allow"] == "OPTIONS, POST"
    assert client.delete("/captures/1").headers["Allow"] == "GET, HEAD, OPTIONS"
    for path in (f"/api/captures/{2**63}", f"/api/cells/{2**64}", f"/captures/{10**30}", f"/images/crop/{2**63}"):
        assert client.get(path).status_code == 404, path  # was an OverflowError (500)
    assert client.get(f"/captures?page={2**63}").status_code == 200
    assert client.get(f"/api/captures?offset={2**70}&limit={2**70}").status_code == 400  # out of the declared range
    assert client.get(f"/api/reviews?cell={2**63}").status_code == 400
    assert client.get("/captures?label=purple").status_code == 400
    assert client.get("/api/captures?from=2024-13-45").get_json()["error"].startswith("from")
    assert client.get("/").status_code == 200


def test_a_full_disk_on_upload_is_507_on_both_the_page_and_the_api(config, monkeypatch):
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        tok = token_of(client.get("/upload").get_data(as_text=True))
        monkeypatch.setattr(appliance.store, "min_free_mb", 10**12)
        good = encode_image(appliance.bundle.golden.crops[0], "PNG")
        form = lambda: {"image": (io.BytesIO(good), "c.png"), "single_cell": "1", "csrf_token": tok}  # noqa: E731
        page = client.post("/upload", data=form(), content_type="multipart/form-data")
        assert page.status_code == 507 and "disk almost full" in page.get_data(as_text=True)
        api = client.post("/api/upload", data=form(), content_type="multipart/form-data", headers={"X-CSRFToken": tok})
        assert api.status_code == 507 and "disk" in api.get_json()["error"]
        assert appliance.store.count_captures() == 0


def test_domain_errors_map_to_http_codes_by_type_not_by_message():
    from device.errors import (
        BundleError,
        BusyError,
        CameraError,
        ImageError,
        InputError,
        LeukoCamError,
        NotFoundError,
        StoreError,
        StoreFullError,
    )
    from device.web import http_status

    # The messages mention "disk" on purpose: only the type decides.
    assert http_status(StoreFullError("no room")) == 507
    assert http_status(StoreError("disk database is newer")) == 500
    assert http_status(NotFoundError("disk 3")) == 404
    assert http_status(InputError("x")) == http_status(ImageError("x")) == 400
    assert http_status(BusyError("x")) == 409
    assert http_status(CameraError("x")) == http_status(BundleError("x")) == 503
    assert http_status(LeukoCamError("disk")) == 500


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/slides", "[1, 2]"),
        ("/api/slides", '"S1"'),
        ("/api/slides", '{"id": 5}'),
        ("/api/slides", '{"id": ["a"]}'),
        ("/api/slides/S1/reviewed", '{"reviewer": {"x": 1}}'),
        ("/api/cells/1/review", "[]"),
        ("/api/cells/1/review", '{"label": 1}'),
        ("/api/cells/1/review", '{"label": "blast", "note": []}'),
        ("/api/cells/1/review", "{"),
        ("/api/capture", "17"),
        ("/api/slides", "[" * 100_000 + "]" * 100_000),
        ("/api/cells/1/review", '{"a":' * 50_000 + "1" + "}" * 50_000),
        ("/login", "[1]"),
    ],
)
def test_json_bodies_of_the_wrong_shape_are_400_not_500(config, path, body):
    with Appliance(config) as appliance:
        appliance.capture_now("test")
        appliance.new_slide("S1")
        appliance.start()
        client = create_app(appliance).test_client()
        resp = client.post(path, data=body, content_type="application/json")
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:200])
        assert client.get("/api/health").status_code == 200


@pytest.mark.parametrize("slide_id", [".", "..", "...", ".hidden", "a/b", "", " ", "x" * 65])
def test_dot_and_path_like_slide_ids_are_refused(config, slide_id):
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        resp = client.post("/api/slides", json={"id": slide_id})
        assert resp.status_code == 400 and "1-64 letters" in resp.get_json()["error"]
        with pytest.raises(InputError, match="slide ID"):
            appliance.new_slide(slide_id or " ")
        dated = client.post("/api/slides", json={})  # no id: a dated one, as documented
        assert dated.status_code == 201 and dated.get_json()["current"].startswith("slide-")
    assert [s for s in appliance.store.list_slides() if s["id"].startswith(".")] == []
