"""`--strategy multiworker` on loopback: real worker processes, one command each, TF_CONFIG as on several machines.

Two workers train smallcnn on a tiny SYNTHETIC set (both stages, with augmentation): both exit 0, only the
chief's run folder is written and converts, the other worker's temporary folder is gone. A killed worker
makes the other stop within --worker-timeout with a message, and the restarted pair resumes from the
chief's checkpoint. A worker whose peer never starts stops after the timeout too. `--strategy mirrored`
runs the same step on two (logical CPU) devices of one process. 2 cores: about 2 minutes in all.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from training.distributed import (
    ClusterError,
    Worker,
    current_worker,
    free_loopback_ports,
    launch_loopback_worker,
    loopback_tf_config,
    worker_folder,
)

needs_tf = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow (the train extra)"
)
RUN_FILES = ("model.keras", "training.json", "metrics.json", "folds.csv", "report.md", "training_curves.png")
LOST = "lost contact with the other workers"
OPEN_GATE = dict(min_agreement=0.0, max_delta_sensitivity=1.0, min_cam_correlation=-1.0)


def slow_tf(test):
    return pytest.mark.slow(pytest.mark.tf(needs_tf(test)))


# TF_CONFIG and the worker's folder: no TensorFlow needed.


def test_worker_comes_from_tf_config():
    env = {"TF_CONFIG": json.dumps(loopback_tf_config([1, 2, 3], 2))}
    worker = current_worker("multiworker", env)
    assert (worker.index, worker.count, worker.is_chief) == (2, 3, False)
    assert worker.positions(8) == [2, 5]
    assert current_worker("multiworker", {"TF_CONFIG": json.dumps(loopback_tf_config([1, 2], 0))}).is_chief
    # A "chief" job is worker 0 and the "worker" tasks follow it, as tf.distribute numbers them.
    both = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
    assert current_worker("multiworker", {"TF_CONFIG": json.dumps(both)}) == Worker(1, 3, ("a:1", "b:1", "c:1"))
    assert current_worker("default", {}) == Worker() and Worker().is_chief


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "needs the TF_CONFIG"),
        ("{not json", "not a valid cluster description"),
        (json.dumps(loopback_tf_config([1, 2], 2)), "not in its cluster"),
        (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}), "ps"),
    ],
)
def test_bad_tf_config_is_a_one_line_error(raw, message):
    with pytest.raises(ClusterError, match=message):
        current_worker("multiworker", {} if raw is None else {"TF_CONFIG": raw})


def test_only_the_chief_keeps_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with worker_folder(tmp_path / "run", Worker(1, 2)) as folder:
        (folder / "model.keras").write_text("x")
        assert folder.parent == tmp_path / "tmp"
    assert not folder.exists() and not (tmp_path / "run").exists()
    with worker_folder(tmp_path / "run", Worker(0, 2)) as folder:
        assert folder == tmp_path / "run"
    assert folder.is_dir()


# Real workers on loopback.


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from training.synth import write_cell_dataset

    root = tmp_path_factory.mktemp("mw_cells")
    summary = write_cell_dataset(root / "cells", n_subjects=8, cells_per_subject=10, size=64, seed=1)
    return root / "cells", summary["um_per_px"]


class Workers:
    """`leukocam train ... --strategy multiworker` once per worker, each with its TF_CONFIG, logs in files."""

    def __init__(
        self, tmp_path: Path, cells, ports: list[int], args: list[str], indexes=None, tag: str = "run", extra=None
    ):
        data, um_per_px = cells
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.logs = [tmp_path / f"{tag}-worker{i}.log" for i in range(len(ports))]
        self.procs: dict[int, subprocess.Popen] = {}
        for i in range(len(ports)) if indexes is None else indexes:
            command = [str(data), "--out", str(tmp_path / "run"), "--backbone", "smallcnn", "--input-size", "48"]
            command += ["--weights", "none", "--um-per-px", str(um_per_px), *args, *(extra or {}).get(i, [])]
            self.procs[i] = launch_loopback_worker(ports, i, command, self.logs[i], REPO, self.tmpdir)

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, i: int, timeout: float) -> int:
        try:
            return self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker {i} still running after {timeout} s:\n{self.log(i)[-3000:]}")

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def leftover_folders(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.glob("leukocam-worker*"))


@slow_tf
def test_two_workers_train_and_only_the_chief_writes_the_run(cells, tmp_path):
    from convert.build import ConvertOptions, convert_bundle
    from convert.verify import Gate
    from device.bundle import load_bundle

    t0 = time.monotonic()
    # Both stages, with augmentation (on by default); the same --out on both, as on two machines.
    workers = Workers(
        tmp_path, cells, free_loopback_ports(2), ["--stages", "2", "--epochs", "1", "--worker-timeout", "120"]
    )
    try:
        codes = [workers.wait(i, 240) for i in (0, 1)]
    finally:
        workers.kill()
    assert codes == [0, 0], workers.log(0)[-3000:] + workers.log(1)[-3000:]
    wall = time.monotonic() - t0
    assert "the chief (worker 0) writes" in workers.log(1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run", "tmp"], "exactly one run folder"
    run = tmp_path / "run"
    assert all((run / name).is_file() for name in RUN_FILES), sorted(p.name for p in run.iterdir())
    assert not (run / "checkpoint").exists(), "the checkpoint goes once the run is written"
    assert workers.leftover_folders() == [], "the other worker's temporary folder is removed"
    info = json.loads((run / "training.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert info["options"]["strategy"] == "multiworker" and metrics["stages"] == 2
    assert {"head_loss", "loss", "val_loss"} <= set(info["history"])
    # The chief records every worker's training images, not only its shard, and folds.csv every image.
    data, _ = cells
    n_images = sum(1 for _ in data.rglob("*.bmp"))
    assert sum(len(v) for v in info["split_files"].values()) == n_images
    assert len((run / "folds.csv").read_text().strip().splitlines()) == n_images + 1
    # The model loads and converts.
    result = convert_bundle(
        run / "model.keras",
        data,
        tmp_path / "bundle",
        ConvertOptions(calibration=16, gate=Gate(**OPEN_GATE), parity_fields=0),
    )
    assert load_bundle(result.bundle_dir).info.training["options"]["strategy"] == "multiworker"
    print(f"two workers on loopback: {wall:.1f} s wall for both processes")


@slow_tf
def test_a_killed_worker_stops_the_other_and_the_restart_resumes(cells, tmp_path):
    ports, timeout = free_loopback_ports(2), 30
    # Many epochs: the kill lands mid-training (early stopping needs 8 epochs without improvement).
    workers = Workers(tmp_path, cells, ports, ["--stages", "1", "--epochs", "400", "--worker-timeout", str(timeout)])
    try:
        deadline = time.monotonic() + 180
        while "epoch 2/" not in workers.log(0) and time.monotonic() < deadline and workers.procs[0].poll() is None:
            time.sleep(0.1)
        assert "epoch 2/" in workers.log(0), workers.log(0)[-3000:]
        workers.procs[1].kill()
        killed = time.monotonic()
        code = workers.wait(0, timeout + 60)
        stopped_after = time.monotonic() - killed
    finally:
        workers.kill()
    log = workers.log(0)
    assert code != 0 and LOST in log and "To resume" in log, log[-3000:]
    assert stopped_after < timeout + 10, f"the chief took {stopped_after:.1f} s to stop"
    run = tmp_path / "run"
    assert (run / "checkpoint" / "state.json").is_file() and not (run / "model.keras").exists()
    epoch = json.loads((run / "checkpoint" / "state.json").read_text())["epoch"]
    assert epoch >= 2
    # The killed worker could not remove its temporary folder; the restarted one does, and the pair
    # continues from the chief's checkpoint (the other worker gets it from the chief).
    assert len(workers.leftover_folders()) == 1
    again = Workers(tmp_path, cells, ports, ["--stages", "1", "--epochs", str(epoch + 1)], tag="resume")
    try:
        codes = [again.wait(i, 180) for i in (0, 1)]
    finally:
        again.kill()
    assert codes == [0, 0], again.log(0)[-3000:] + again.log(1)[-3000:]
    assert f"resuming stage 1 after epoch {epoch}" in again.log(0)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == epoch + 1 and not (run / "checkpoint").exists()
    assert again.leftover_folders() == []
    print(f"survivor stopped {stopped_after:.1f} s after the kill")


@slow_tf
def test_a_killed_chief_stops_the_other_worker(cells, tmp_path):
    timeout = 30
    workers = Workers(
        tmp_path, cells, free_loopback_ports(2), ["--stages", "1", "--epochs", "400", "--worker-timeout", str(timeout)]
    )
    try:
        deadline = time.monotonic() + 180
        while "epoch 2/" not in workers.log(1) and time.monotonic() < deadline and workers.procs[1].poll() is None:
            time.sleep(0.1)
        assert "epoch 2/" in workers.log(1), workers.log(1)[-3000:]
        workers.procs[0].kill()
        killed = time.monotonic()
        code = workers.wait(1, timeout + 60)
        stopped_after = time.monotonic() - killed
    finally:
        workers.kill()
    assert code != 0 and LOST in workers.log(1), workers.log(1)[-3000:]
    assert stopped_after < timeout + 10
    assert workers.leftover_folders() == [], "the surviving worker removed its temporary folder"
    assert (tmp_path / "run" / "checkpoint" / "state.json").is_file() and not (
        tmp_path / "run" / "model.keras"
    ).exists()


@slow_tf
def test_a_worker_whose_peer_never_starts_stops_after_the_timeout(cells, tmp_path):
    timeout = 8
    t0 = time.monotonic()
    workers = Workers(
        tmp_path, cells, free_loopback_ports(2), ["--epochs", "1", "--worker-timeout", str(timeout)], indexes=[1]
    )
    try:
        code = workers.wait(1, timeout + 60)
    finally:
        workers.kill()
    log = workers.log(1)
    assert code != 0 and "join the cluster" in log and f"waited more than {timeout} s" in log, log[-3000:]
    assert time.monotonic() - t0 < timeout + 40
    time.sleep(1)  # the watchdog removes the folder just after it stops the worker
    assert workers.leftover_folders() == []
    assert not (tmp_path / "run").exists()


@slow_tf
def test_workers_started_with_different_options_refuse_to_train(cells, tmp_path):
    workers = Workers(
        tmp_path,
        cells,
        free_loopback_ports(2),
        ["--worker-timeout", "60"],
        extra={0: ["--epochs", "2"], 1: ["--epochs", "3"]},
    )
    try:
        codes = [workers.wait(i, 120) for i in (0, 1)]
    finally:
        workers.kill()
    for i in (0, 1):
        assert codes[i] != 0 and "do not have the same training options" in workers.log(i), workers.log(i)[-2000:]
    assert workers.leftover_folders() == [] and not (tmp_path / "run" / "model.keras").exists()


MIRRORED = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
devices = ["/cpu:0", "/cpu:1"]
strategy_class = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda *args, **kwargs: strategy_class(devices)  # two "GPUs"
from training.distributed import Cluster, Worker
cluster = Cluster(tf.distribute.MirroredStrategy(), Worker(), 10)
assert cluster.replicas == 2 and cluster.all_reduce_sum([3.0]).tolist() == [3.0], "one contribution per worker"
from training.train import TrainOptions, run_training
opts = TrainOptions(input_size=48, epochs=2, backbone="smallcnn", weights="none", stages=1, balance="oversample",
                    strategy="mirrored", um_per_px=float(sys.argv[3]))
metrics = run_training(sys.argv[1], sys.argv[2], opts, progress=True)
print("METRICS", json.dumps({"epochs_run": metrics["epochs_run"], "n": metrics["test"]["n"]}))
"""


@slow_tf
def test_mirrored_on_two_devices_writes_the_run(cells, tmp_path):
    data, um_per_px = cells
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(data), str(tmp_path / "run"), str(um_per_px)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 replicas" in done.stderr
    result = json.loads(done.stdout.split("METRICS", 1)[1])
    assert result["epochs_run"] == 2 and result["n"] > 0
    assert all((tmp_path / "run" / name).is_file() for name in RUN_FILES)
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["train_images_per_second"])


@slow_tf
def test_bench_measures_one_and_two_workers_in_one_run():
    from convert.bench import bench_multiworker, training_markdown

    result = bench_multiworker(cells_per_subject=24, epochs=2)
    assert [row["workers"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["last_epoch_images_per_s"] > 0 and row["epochs"] == 2
        assert 0 < row["fit_s"] < row["wall_s"]
    text = training_markdown(
        {"input_size": 32, "batch": 2, "cpu": "test", "cores": 2, "stage1_images_per_s": 1.0,
         "stage2_images_per_s": 1.0, "multiworker": result}
    )  # fmt: skip
    assert "| 1 | " in text and "| 2 | " in text and "1.00×" in text and "SYNTHETIC" in text
