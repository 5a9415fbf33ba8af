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
    resp = client.get("/captures/1")
    assert resp.status_code == 302 and "/login?next=/captures/1" in resp.headers["Location"]
    resp = client.get("/api/captures")
    assert resp.status_code == 401 and "login required" in resp.get_json()["error"]
    assert client.get("/images/field/1").status_code == 302
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


def test_open_redirect_after_login_is_refused(secured):
    _, _, client = secured
    tok = token_of(client.get("/login").get_data(as_text=True))
    resp = client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": tok, "next": "//evil.example/x"}
    )
    assert resp.headers["Location"] == "/"


def test_csrf_missing_or_wrong_is_refused_with_a_reason(secured):
    appliance, _, client = secured
    login(client)
    tok = token_of(client.get("/").get_data(as_text=True))
    missing = client.post("/api/capture")
    assert missing.status_code == 400 and "CSRF token is missing" in missing.get_json()["error"]
    wrong = client.post("/api/capture", headers={"X-CSRFToken": "forged"})
    assert wrong.status_code == 400 and "forged" in wrong.get_json()["error"]
    page = client.post("/slides", data={"id": "EVIL"})
    assert page.status_code == 400 and "forged or expired request" in page.get_data(as_text=True)
    assert appliance.slide_id != "EVIL"
    cell = appliance.store.get_capture(1)["cells"][0]["id"]
    assert client.post(f"/api/cells/{cell}/review", json={"label": "blast"}).status_code == 400
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
    assert resp.status_code == 400


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
        assert forged.status_code == 400
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
    assert client.get("/api/capture").status_code == 405
    assert client.get("/api/capture").get_json()["error"]
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
