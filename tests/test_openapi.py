"""/api/openapi.json as a client sees it: a valid OpenAPI 3.1 document, generated from the routes'
declarations, true in each mode, and checked by Schemathesis against a live `leukocam serve`.

Schemathesis runs as its command line does in CI elsewhere: all checks, a fixed seed, a bounded
number of examples per operation, once with the login gate off (loopback) and once on
(`[web] login = "always"`, with a session this test makes). Both runs must end with 0 failures
and 0 schema errors. Together they add about 40 s to `make test` on this machine.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from device import accounts
from device.service import Appliance
from device.web import create_app
from tests.test_hostile import serving

SEED = 20261126
MAX_EXAMPLES = 25
PASSWORD = "correct horse battery"
UPLOAD_OVERRIDE = """
[[operations]]
include-operation-id = "api.upload.post"
# Any bytes fit the document's "binary" image, but only a real picture can be analysed: the answer to the
# rest is a documented 400 that says what was wrong. Every other operation keeps the default expectations.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "409", "413"]
"""


@pytest.fixture(params=[False, True], ids=["loopback", "login"])
def spec_and_app(config, request):
    with Appliance(config) as appliance:
        app = create_app(appliance, login_required=request.param)
        client = app.test_client()
        yield client.get("/api/openapi.json").get_json(), app, request.param


def test_the_document_is_valid_openapi(spec_and_app):
    spec, _, _ = spec_and_app
    validate(spec)  # openapi-spec-validator: raises on any error
    assert spec["openapi"] == "3.1.0"


def test_every_route_parameter_and_status_is_declared(spec_and_app):
    spec, app, _ = spec_and_app
    api_rules = {r.rule for r in app.url_map.iter_rules() if r.endpoint.startswith(("api.", "auth."))}
    api_rules.add("/images/<kind>/<int:item_id>")
    documented = {p.replace("{", "<").replace("}", ">") for p in spec["paths"]}
    assert {r.replace("int:", "") for r in api_rules} == documented
    for path, ops in spec["paths"].items():
        names = {n.strip("{}") for n in path.split("/") if n.startswith("{")}
        for method, op in ops.items():
            params = op.get("parameters", [])
            assert {p["name"] for p in params if p["in"] == "path"} == names, (path, method)
            assert op["summary"] and op["operationId"]
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")):
                    assert "application/json" in response["content"], (path, code)
    captures = spec["paths"]["/api/captures"]["get"]
    query = {p["name"]: p["schema"] for p in captures["parameters"] if p["in"] == "query"}
    assert set(query) == {"slide", "label", "review", "from", "to", "limit", "offset"}
    assert query["limit"] == {
        "type": "integer",
        "format": "int64",
        "minimum": 1,
        "maximum": 100,
        "default": 20,
        "description": "page size",
    }
    assert spec["paths"]["/api/captures/{capture_id}"]["get"]["parameters"][0]["schema"]["type"] == "integer"
    assert spec["paths"]["/images/{kind}/{item_id}"]["get"]["parameters"][0]["schema"]["enum"] == [
        "field",
        "crop",
        "heatmap",
    ]
    assert "202" in spec["paths"]["/api/capture"]["post"]["responses"]
    assert "201" in spec["paths"]["/api/slides"]["post"]["responses"]
    assert "201" in spec["paths"]["/api/cells/{cell_id}/review"]["post"]["responses"]
    review = spec["paths"]["/api/cells/{cell_id}/review"]["post"]["requestBody"]["content"]["application/json"]
    assert review["schema"]["required"] == ["label"]
    ok = spec["paths"]["/api/captures"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["required"] == ["captures", "limit", "offset", "total"]


def test_security_is_stated_per_mode(spec_and_app):
    spec, _, login_on = spec_and_app
    capture = spec["paths"]["/api/capture"]["post"]
    health = spec["paths"]["/api/health"]["get"]
    assert health.get("security", spec["security"]) == []  # public in both modes
    assert "X-CSRFToken" not in str(capture.get("parameters", []))  # a security scheme, not a required header
    if login_on:
        assert spec["security"] == [{"session": []}]
        assert capture["security"] == [{"session": [], "csrf": []}]
        assert "401" in spec["paths"]["/api/captures"]["get"]["responses"]
        assert "login gate is ON" in spec["info"]["description"]
    else:
        assert spec["security"] == []
        # a script without browser headers needs nothing; a browser needs the CSRF header
        assert capture["security"] == [{}, {"csrf": []}]
        assert "401" not in spec["paths"]["/api/captures"]["get"]["responses"]
        assert "login gate is OFF" in spec["info"]["description"]
    assert "403" in capture["responses"]


def test_declared_limits_are_what_the_server_enforces(config):
    with Appliance(config) as appliance:
        client = create_app(appliance).test_client()
        assert client.get("/api/captures?limit=100").status_code == 200
        for bad in ("limit=0", "limit=101", "limit=abc", "offset=-1", "label=", "label=purple", "from=2024-13-01"):
            resp = client.get(f"/api/captures?{bad}")
            assert resp.status_code == 400 and resp.get_json()["error"].startswith(bad.split("=")[0]), bad
        assert client.post("/api/capture", json={"trigger": "robot"}).status_code == 400
        assert client.post("/api/slides", json={"id": ".hidden"}).status_code == 400
        assert client.post("/api/cells/1/review", json={"label": "blast", "note": "x" * 2001}).status_code == 400
        assert client.get("/api/reviews").status_code == 200  # no filter: the newest reviews
        assert client.application.config["LEUKOCAM_LOGIN_REQUIRED"] is False


# -- Schemathesis against the live service ------------------------------------------------------------


def _schemathesis(base: str, config_text: str, tmp_path: Path, *extra: str) -> str:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(config_text)
    cmd = [
        exe,
        "--config-file",
        str(cfg),
        "run",
        f"{base}/api/openapi.json",
        "--checks",
        "all",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--generation-database",
        "none",
        "--no-color",
        "--request-timeout",
        "30",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    print(f"schemathesis: {time.monotonic() - started:.1f} s; {out.strip().splitlines()[-1]}")
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and "failure" not in out.split("SUMMARY")[-1] and "error" not in out.split("SUMMARY")[-1]
    return out


@pytest.mark.slow
def test_schemathesis_finds_nothing_with_the_login_gate_off(tmp_path):
    with serving(tmp_path) as (base, proc):
        _schemathesis(base, UPLOAD_OVERRIDE, tmp_path)
        assert proc.poll() is None


@pytest.mark.slow
def test_schemathesis_finds_nothing_with_the_login_gate_on(tmp_path):
    accounts.set_password(tmp_path / "store", "alice", PASSWORD)
    with serving(tmp_path, web_extra='login = "always"\n') as (base, proc):
        session = requests.Session()
        token = session.get(base + "/api/csrf", timeout=10).json()["csrf_token"]
        login = session.post(
            base + "/login", json={"username": "alice", "password": PASSWORD}, headers={"X-CSRFToken": token}
        )
        assert login.status_code == 200
        auth = (
            f'[auth.openapi.session]\napi_key = "{session.cookies["leukocam_session"]}"\n'
            f'[auth.openapi.csrf]\napi_key = "{login.json()["csrf_token"]}"\n'
        )
        # POST /logout would end the test's own session half-way; test_security covers it.
        _schemathesis(base, auth + UPLOAD_OVERRIDE, tmp_path, "--exclude-operation-id", "auth.logout.post")
        assert proc.poll() is None
        assert requests.get(base + "/api/status", cookies=session.cookies, timeout=10).status_code == 200


def test_the_openapi_module_has_nothing_hand_kept(config):
    """The document is built from the declarations the views parse their input with: change one, both change."""
    from device.web import api

    with Appliance(config) as appliance:
        app = create_app(appliance)
        for rule in app.url_map.iter_rules():
            if rule.endpoint.startswith("api."):
                assert hasattr(app.view_functions[rule.endpoint], "api_doc"), rule.endpoint
    assert dataclasses.is_dataclass(api.REVIEWER)
