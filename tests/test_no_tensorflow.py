"""The device side runs with TensorFlow and Keras made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "training", "convert"):
                raise ImportError(f"blocked by test: {name}")
    sys.meta_path.insert(0, Block())
""")


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_device_classifies_a_field_without_tensorflow(tmp_path):
    result = run(f"""
        import sys, dataclasses
        from device.config import Config, StoreConfig, ServiceConfig
        from device.service import Appliance
        import device.web, device.cli
        cfg = dataclasses.replace(Config(), store=StoreConfig(data_dir={str(tmp_path)!r}, min_free_mb=1),
                                  service=ServiceConfig(startup_captures=0))
        with Appliance(cfg) as app:
            assert app.self_test.passed
            out = app.capture_now("test")
            cap = app.store.get_capture(out.capture_id)
        assert cap["n_cells"] > 0, cap
        loaded = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "training", "convert")]
        assert not loaded, loaded
        print("OK", cap["n_cells"], app.classifier.runtime)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
    assert "ai_edge_litert" in result.stdout


def test_cli_capture_and_help_without_tensorflow(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\ndata_dir = "{tmp_path / "s"}"\nmin_free_mb = 1\n[service]\nstartup_captures = 0\n')
    result = run("from device.cli import main; main()", "capture", "--json", "--config", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"status": "ok"' in result.stdout
    helped = run("from device.cli import main; main()", "--help")
    assert helped.returncode == 0 and "convert" in helped.stdout
    missing = run("from device.cli import main; main()", "train", "x")
    assert missing.returncode != 0 and "leukocam[train]" in missing.stderr
