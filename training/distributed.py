"""Training on several machines (`--strategy multiworker`) or several GPUs of one (`--strategy mirrored`).

The engine is tf.distribute: `MultiWorkerMirroredStrategy` (synchronous data parallelism, one replica per
device of every worker, gradients all-reduced with collective ops over gRPC) or `MirroredStrategy`. Why not
`model.fit`: Keras 3's `fit` cannot drive `MultiWorkerMirroredStrategy` with the pinned TensorFlow/Keras.
Before the first step it reduces the first distributed batch, a tuple of `PerReplica` values, with
`strategy.reduce`, which the multi-worker strategy cannot convert ("Attempt to convert a value (PerReplica:
{...}) with an unsupported type"; keras-team/keras#20585, tensorflow/tensorflow#72388). Keras 3's own
distribution API (`keras.distribution`) is for the JAX backend. So the distributed strategies run the
custom training step that TensorFlow documents for custom training loops under a strategy, made of the
strategy's own parts only:

* input: `strategy.distribute_datasets_from_function`; each worker's pipeline yields only the images of its
  shard, batched to the per-replica batch (the global batch is that times the number of replicas), repeated,
  so that every worker runs exactly the same number of steps per epoch;
* step: `strategy.run` of a forward and backward pass per replica, the loss averaged over the global batch
  (`tf.nn.compute_average_loss`); the Keras optimizer, created under the strategy's scope, all-reduces the
  gradients across all replicas before it updates the mirrored variables;
* metrics: sums (loss, correct, count) all-reduced with `strategy.reduce`, so every worker sees the same
  numbers and takes the same early-stopping decision (which the chief's value settles anyway);
* BatchNorm: Keras 3 lets every replica update its own copy of the moving statistics from its own batches,
  so after every epoch they are set to their mean over all replicas (one all-reduce): every worker then
  holds the same model.

Around it, what a cluster of processes needs: the worker's role from `TF_CONFIG` (the chief is worker 0,
or the "chief" task), a run folder that only the chief keeps (the others write into temporary folders
that are removed), a check that every worker split the same data the same way, a checkpoint after every
epoch that a restarted cluster resumes from (the chief reads it and broadcasts it to the others), and a
bounded wait: a worker that waits longer than `--worker-timeout` for the others stops with a message.
TensorFlow's coordination service, whose heartbeats abort the collectives when a peer dies, usually
notices a dead worker first; the watchdog covers the waits it does not (joining a cluster whose other
workers never start, a peer that hangs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device.errors import LeukoCamError

DISTRIBUTED_STRATEGIES = ("mirrored", "multiworker")
LAUNCH_HELP = "see docs/training.md, 'Several GPUs or machines'"


class ClusterError(LeukoCamError):
    """The cluster cannot train: bad TF_CONFIG, workers that disagree about the data, or a lost worker."""


@dataclass(frozen=True)
class Worker:
    """This process's place in the cluster: worker `index` of `count` (0 is the chief, which writes the run)."""

    index: int = 0
    count: int = 1
    addresses: tuple[str, ...] = ()

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    @property
    def name(self) -> str:
        return f"worker {self.index} of {self.count}" + (" (chief)" if self.is_chief else "")

    def positions(self, n: int) -> list[int]:
        """This worker's shard of n items: every count-th one, starting at its index."""
        return list(range(self.index, n, self.count))


def current_worker(strategy: str, environ: dict | None = None) -> Worker:
    """The worker this process is: from TF_CONFIG for "multiworker", else the only (chief) worker.

    TF_CONFIG is TensorFlow's cluster description, e.g. {"cluster": {"worker": ["hostA:23456", "hostB:23456"]},
    "task": {"type": "worker", "index": 0}}; a "chief" job, when present, is worker 0 and the "worker" tasks
    follow it (tf.distribute's numbering). Raises ClusterError when it is missing or malformed.
    """
    if strategy != "multiworker":
        return Worker()
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        raise ClusterError(
            "--strategy multiworker needs the TF_CONFIG environment variable on every worker, e.g. "
            'TF_CONFIG=\'{"cluster":{"worker":["hostA:23456","hostB:23456"]},"task":{"type":"worker","index":0}}\' '
            f"({LAUNCH_HELP})"
        )
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, task_index = str(task["type"]), int(task["index"])
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"TF_CONFIG is not a valid cluster description ({exc}); {LAUNCH_HELP}") from None
    other_jobs = sorted(set(cluster) - {"chief", "worker"})
    if other_jobs:
        raise ClusterError(f"TF_CONFIG has jobs {other_jobs}: multiworker training uses only chief and worker tasks")
    if len(chiefs) > 1:
        raise ClusterError("TF_CONFIG has more than one chief")
    jobs = {"chief": chiefs, "worker": workers}
    if task_type not in jobs or not 0 <= task_index < len(jobs[task_type]):
        raise ClusterError(
            f"TF_CONFIG's task {task_type} {task_index} is not in its cluster "
            f"({len(chiefs)} chief, {len(workers)} workers); indexes start at 0"
        )
    index = task_index if task_type == "chief" else len(chiefs) + task_index
    return Worker(index=index, count=len(chiefs) + len(workers), addresses=tuple(chiefs + workers))


@contextlib.contextmanager
def worker_folder(out_dir: str | Path, worker: Worker) -> Iterator[Path]:
    """The folder this worker writes to: the run folder for the chief, else a temporary folder removed on exit.

    Every worker runs the same steps (checkpoints, the saved model); only the chief's land in the run.
    """
    if worker.is_chief:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    _remove_stale_worker_folders()
    tmp = Path(tempfile.mkdtemp(prefix=f"{WORKER_FOLDER_PREFIX}{worker.index}-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WORKER_FOLDER_PREFIX = "leukocam-worker"


def _remove_stale_worker_folders() -> None:
    """Remove the temporary folders of this machine's workers that were killed (SIGKILL leaves them behind)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKER_FOLDER_PREFIX}*-*-*"):
        try:
            pid = int(folder.name[len(WORKER_FOLDER_PREFIX) :].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The watchdog runs in a small separate process: while a worker joins the cluster, TensorFlow blocks in C++
# holding the GIL, so no Python thread of the worker could notice the wait, nor could a signal handler run.
_WATCHDOG = r"""
import json, os, select, shutil, signal, sys, time
parent, cleanup = int(sys.argv[1]), sys.argv[2]
fd, buf, deadline, message = sys.stdin.fileno(), b"", None, ""
while True:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        chunk = os.read(fd, 65536)
        if not chunk:
            sys.exit(0)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            command = json.loads(line)
            if command is None:
                deadline = None
            else:
                deadline, message = time.monotonic() + command[0], command[1]
    elif deadline is not None and time.monotonic() >= deadline:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os.kill(parent, signal.SIGKILL)
        if cleanup:
            time.sleep(0.5)
            shutil.rmtree(cleanup, ignore_errors=True)
        sys.exit(0)
"""


class Watchdog:
    """Stops the worker when one wait for the other workers lasts longer than `timeout_s`.

    A worker blocked in a collective whose peer has died, or in joining a cluster whose other workers never
    come, cannot be interrupted from Python: a helper process prints the reason and kills it (exit status
    137), then removes `cleanup` (a non-chief's temporary folder). It exits with the worker.
    """

    def __init__(self, timeout_s: float, worker: Worker, resume_hint: str = "", cleanup: Path | None = None):
        self.timeout_s = float(timeout_s)
        self.worker = worker
        self.resume_hint = resume_hint
        self._depth = 0
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(cleanup or "")],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )

    def message(self, what: str) -> str:
        return (
            f"error: {self.worker.name} lost contact with the other workers: waited more than "
            f"{self.timeout_s:g} s (--worker-timeout) for {what}. Another worker has probably stopped or was "
            "never started; see its log. This worker stops and writes no run." + self.resume_hint
        )

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Armed for `timeout_s` while the block runs (the outermost of nested waits counts)."""
        self._depth += 1
        if self._depth == 1:
            self._send([self.timeout_s, self.message(what)])
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._send(None)

    def close(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def _send(self, command) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.write((json.dumps(command) + "\n").encode())
            self._process.stdin.flush()


@dataclass
class Cluster:
    """The strategy and this worker's place in it, with the few collectives the training needs besides steps."""

    strategy: object
    worker: Worker
    timeout_s: float
    watchdog: Watchdog | None = None
    resume_hint: str = ""

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def local_replicas(self) -> int:
        return len(self.strategy.extended.worker_devices)

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """A step that waits for the other workers: bounded by the watchdog, lost peers turned into ClusterError."""
        import tensorflow as tf

        lost = (
            tf.errors.UnavailableError,
            tf.errors.DeadlineExceededError,
            tf.errors.CancelledError,
            tf.errors.AbortedError,
        )
        guard = self.watchdog.waiting(what) if self.watchdog else contextlib.nullcontext()
        with guard:
            try:
                yield
            except lost as exc:
                raise ClusterError(
                    f"{self.worker.name} lost contact with the other workers during {what}: another worker "
                    f"has stopped or cannot be reached ({_cause(exc)}). This worker stops and writes no run."
                    + self.resume_hint
                ) from None

    def all_reduce_sum(self, value, what: str = "an all-reduce") -> np.ndarray:
        """The sum over workers of each worker's `value` (a number or array of the same shape on every worker)."""
        import tensorflow as tf

        local = tf.constant(np.asarray(value, dtype=np.float64))
        per_worker = self.local_replicas

        def fn(ctx):  # one contribution per worker: its first replica's
            return local if ctx.replica_id_in_sync_group % per_worker == 0 else tf.zeros_like(local)

        with self.waiting(what):
            values = self.strategy.experimental_distribute_values_from_function(fn)
            return np.asarray(self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None))

    def from_chief(self, value, what: str = "the chief's decision") -> np.ndarray:
        """The chief's `value` on every worker (the others contribute zeros to a sum)."""
        value = np.asarray(value, dtype=np.float64)
        return self.all_reduce_sum(value if self.worker.is_chief else np.zeros_like(value), what)

    def check_same(self, fingerprint: str, what: str, advice: str) -> None:
        """Raise ClusterError on every worker unless all of them computed the same fingerprint of `what`."""
        if self.worker.count == 1:
            return
        digits = np.frombuffer(bytes.fromhex(fingerprint[:16]), dtype=np.uint8).astype(np.float64)
        table = np.zeros((self.worker.count, len(digits)))
        table[self.worker.index] = digits
        table = self.all_reduce_sum(table, f"every worker to compare {what}")
        differing = [i for i in range(self.worker.count) if not np.array_equal(table[i], table[0])]
        if differing:
            raise ClusterError(
                f"the workers do not have the same {what}: worker(s) {differing} differ from the chief; {advice}"
            )

    def broadcast_variables(self, variables: list, what: str = "the chief's checkpoint") -> None:
        """Give every worker the chief's values of `variables` (one all-reduce per dtype, others send zeros)."""
        groups: dict[str, list] = {}
        for var in variables:
            groups.setdefault(np.dtype(var.dtype.name if hasattr(var.dtype, "name") else var.dtype).str, []).append(var)
        for group in groups.values():
            arrays = [np.asarray(v.numpy()) for v in group]
            flat = np.concatenate([a.ravel().astype(np.float64) for a in arrays]) if arrays else np.zeros(0)
            flat = self.from_chief(flat, what)
            offset = 0
            for var, array in zip(group, arrays, strict=True):
                var.assign(flat[offset : offset + array.size].reshape(array.shape).astype(array.dtype))
                offset += array.size

    def replica_mean(self, variables: list, what: str) -> Callable[[], None]:
        """A function that sets `variables` (float32, e.g. BatchNorm's moving statistics, which Keras 3 lets
        every replica update from its own batches) to their mean over every replica of every worker."""
        import tensorflow as tf

        strategy = self.strategy
        if not variables:
            return lambda: None

        def local():
            return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(v), tf.float32), [-1]) for v in variables], 0)

        @tf.function
        def mean():
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(local), axis=None)

        def apply() -> None:
            with self.waiting(what):
                flat = mean().numpy()
            offset = 0
            for var in variables:
                size = int(np.prod(var.shape))
                var.assign(flat[offset : offset + size].reshape(var.shape))
                offset += size

        return apply

    def finish(self) -> None:
        """The last collective: every worker has finished training. A Python peer health check stops here, so
        that a worker leaving afterwards does not abort the chief while it writes the run."""
        if self.worker.count > 1:
            self.all_reduce_sum(1.0, "every worker to finish training")
            # Where TensorFlow runs its Python health check (no coordination service), it polls the peers every
            # 30 s in a daemon thread that has no public stop; joining it (_stop_check_health_thread) would wait
            # out its sleep, so only its stop flag is set.
            stop = getattr(self.strategy.extended, "_check_health_thread_should_stop", None)
            if stop is not None:
                stop.set()
        self.close()

    def close(self) -> None:
        if self.watchdog:
            self.watchdog.close()


def _cause(exc: Exception) -> str:
    """The line of a TensorFlow error that says what happened to the peer (not "Graph execution error:")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keys = ("unavailable", "connect", "deadline", "cancelled", "aborted", "reset by peer", "down")
    for line in lines:
        if any(k in line.lower() for k in keys) and not line.startswith("Detected at node"):
            return line[:200]
    return type(exc).__name__


def make_cluster(
    strategy_name: str, worker: Worker, timeout_s: float, resume_hint: str = "", log=None, folder: Path | None = None
) -> Cluster:
    """Create the strategy (for multiworker: join the cluster, waiting at most `timeout_s` for the others).

    `folder` is this worker's folder: a non-chief's temporary one is removed if the watchdog stops it."""
    import tensorflow as tf

    if strategy_name not in DISTRIBUTED_STRATEGIES:
        raise ValueError(f"not a distributed strategy: {strategy_name!r}")
    cleanup = folder if folder is not None and not worker.is_chief else None
    watchdog = Watchdog(timeout_s, worker, resume_hint, cleanup) if worker.count > 1 else None
    cluster = Cluster(None, worker, timeout_s, watchdog, resume_hint)
    if strategy_name == "mirrored":
        cluster.strategy = tf.distribute.MirroredStrategy()
        return cluster
    if log:
        log(f"{worker.name}: joining the cluster {', '.join(worker.addresses)} (waiting at most {timeout_s:g} s)")
    with cluster.waiting(f"every worker to join the cluster ({', '.join(worker.addresses)})"):
        cluster.strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return cluster


def fingerprint(obj) -> str:
    """A short hex digest of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# The training loop.


@dataclass
class FitState:
    """Where a fit stands: the next epoch, the early-stopping counters and the per-epoch history."""

    epoch: int = 0
    best: float = float("inf")
    wait: int = 0
    history: dict[str, list] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FitConfig:
    """One fit: learning rate, maximum epochs, early-stopping patience, steps per epoch and the global batch."""

    learning_rate: float
    epochs: int
    patience: int
    steps_per_epoch: int
    global_batch: int
    label: str = "fit"


class Checkpoint:
    """The last completed epoch of a fit (weights, optimizer, counters, history) and its best weights.

    Written by every worker after every epoch into its own folder (the chief's is `<run>/checkpoint/`); read
    by the chief only, whose values are then broadcast, so the other workers need no copy of it. `key`
    identifies the run (options and split): a checkpoint with another key is ignored and replaced.
    """

    def __init__(self, folder: Path, key: str, cluster: Cluster, log=None):
        self.folder, self.key, self.cluster, self.log = Path(folder), key, cluster, log

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def saved_state(self) -> dict | None:
        """The chief's saved state.json for this key (None elsewhere, or when there is none or it is stale)."""
        if not self.cluster.worker.is_chief or not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if state.get("key") != self.key:
            if self.log:
                self.log(f"ignoring {self.folder}: it belongs to another run (other options or data)")
            return None
        return state

    def resume_point(self) -> tuple[int, int]:
        """(stage, next epoch) of the chief's checkpoint, the same on every worker; (0, 0) when none."""
        state = self.saved_state() or {}
        stage, epoch = self.cluster.from_chief([state.get("stage", 0), state.get("epoch", 0)], "the checkpoint")
        return int(stage), int(epoch)

    def resume(self, stage: int, model, optimizer) -> FitState:
        """Restore the chief's checkpoint of `stage` into model and optimizer on every worker, or a fresh state."""
        state = self.saved_state()
        usable = state is not None and state.get("stage") == stage
        flag = self.cluster.from_chief([1.0 if usable else 0.0], "the checkpoint")
        if flag[0] == 0:
            return FitState()
        if self.cluster.worker.is_chief:
            model.load_weights(self.folder / "last.weights.h5")
            with np.load(self.folder / "optimizer.npz") as saved:
                for i, var in enumerate(optimizer.variables):
                    var.assign(saved[f"v{i}"])
        self.cluster.broadcast_variables(list(model.weights) + list(optimizer.variables))
        numbers = self.cluster.from_chief(
            [state["epoch"], state["best"], state["wait"]] if state else [0.0, 0.0, 0.0], "the checkpoint"
        )
        fit = FitState(epoch=int(numbers[0]), best=float(numbers[1]), wait=int(numbers[2]))
        if state:
            fit.history = state["history"]
            fit.extra = state.get("extra", {})
        if self.log:
            self.log(f"resuming stage {stage} after epoch {fit.epoch} from {self.folder}")
        return fit

    def best_weights(self, model) -> list | None:
        """The saved best weights (chief only; loads them into `model` and returns them)."""
        path = self.folder / "best.weights.h5"
        if not self.cluster.worker.is_chief or not path.is_file():
            return None
        model.load_weights(path)
        return model.get_weights()

    def save(self, stage: int, model, optimizer, state: FitState, improved: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if improved:
            _replace(self.folder / "best.weights.h5", lambda p: model.save_weights(p))
        _replace(self.folder / "last.weights.h5", lambda p: model.save_weights(p))
        arrays = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
        _replace(self.folder / "optimizer.npz", lambda p: np.savez(p, **arrays))
        record = {
            "key": self.key,
            "stage": stage,
            "epoch": state.epoch,
            "best": state.best,
            "wait": state.wait,
            "history": state.history,
            "extra": state.extra,
        }
        _replace(self.state_path, lambda p: Path(p).write_text(json.dumps(record)))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _replace(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary name in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(str(tmp))
    # np.savez adds .npz when the name lacks it
    written = tmp if tmp.exists() else tmp.with_name(tmp.name + ".npz")
    os.replace(written, path)


def moving_statistics(model) -> list:
    """The moving mean and variance of the model's BatchNorm layers that train (frozen ones do not update)."""
    import keras

    found, stack = [], list(model.layers)
    while stack:
        layer = stack.pop()
        stack.extend(getattr(layer, "layers", []))
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            found += [layer.moving_mean, layer.moving_variance]
    return found


def fit(
    model,
    cluster: Cluster,
    make_train_dataset: Callable,
    val_x: np.ndarray,
    val_y: np.ndarray,
    config: FitConfig,
    checkpoint: Checkpoint | None = None,
    stage: int = 1,
    extra: dict | None = None,
    verbose: bool = False,
) -> FitState:
    """Train `model` (built under the strategy's scope) with a custom step under the strategy.

    `make_train_dataset(input_context, first_epoch)` returns this worker's tf.data pipeline of (image, label,
    sample weight) batches of the per-replica size, repeated forever; every worker runs
    `config.steps_per_epoch` steps per epoch. Validation: each worker scores its own shard (`val_x`, `val_y`)
    and the sums are all-reduced. Early stopping on validation loss as Keras' EarlyStopping(patience,
    restore_best_weights=True) does it. After every epoch the checkpoint (when given) is written; a
    checkpoint of the same `stage` is resumed from. Returns the final state: its history holds the per-epoch
    loss, accuracy, val_loss and val_accuracy, and its `extra` is the `extra` given (stored with the
    checkpoint), or on a resumed chief the one the checkpoint stored.
    """
    import keras
    import tensorflow as tf

    strategy = cluster.strategy
    with strategy.scope():
        optimizer = keras.optimizers.Adam(config.learning_rate)
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    state = checkpoint.resume(stage, model, optimizer) if checkpoint else FitState()
    if not state.epoch:
        state.extra = dict(extra or {})
    best_weights = checkpoint.best_weights(model) if checkpoint and state.epoch else None
    if best_weights is not None:  # best_weights() loaded them: back to the last epoch's weights on the chief
        model.load_weights(checkpoint.folder / "last.weights.h5")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        state.history.setdefault(key, [])

    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    first_epoch = state.epoch
    dataset = strategy.distribute_datasets_from_function(lambda ctx: make_train_dataset(ctx, first_epoch))
    iterator = iter(dataset)

    def replica_step(batch):
        x, y, w = batch
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            per_example = loss_fn(y, logits) * w
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(tf.cast(tf.equal(logits > 0, y > 0.5), tf.float32))
        return tf.stack([tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)])

    @tf.function
    def train_step(it):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(next(it),)), axis=None)

    @tf.function(reduce_retracing=True)
    def logits_of(x):
        return tf.cast(model(x, training=False), tf.float32)

    batch = max(1, config.global_batch // cluster.replicas)
    sync_statistics = cluster.replica_mean(moving_statistics(model), "averaging the BatchNorm statistics")
    for epoch in range(state.epoch, config.epochs):
        t0 = time.time()
        totals = np.zeros(3)
        for step in range(config.steps_per_epoch):
            with cluster.waiting(f"training step {step + 1} of epoch {epoch + 1} ({config.label})"):
                totals += train_step(iterator).numpy()
        sync_statistics()  # before validation, the checkpoint and the best weights: the same model everywhere
        val = np.zeros(3)
        for i in range(0, len(val_x), batch):
            z = logits_of(tf.constant(val_x[i : i + batch], tf.float32)).numpy()[:, 0].astype(np.float64)
            y = np.asarray(val_y[i : i + batch], dtype=np.float64)
            val += [
                np.sum(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))),
                np.sum((z > 0) == (y > 0.5)),
                len(y),
            ]
        val = cluster.all_reduce_sum(val, f"validation after epoch {epoch + 1} ({config.label})")
        logs = cluster.from_chief(
            [
                totals[0] / max(totals[2], 1),
                totals[1] / max(totals[2], 1),
                val[0] / max(val[2], 1),
                val[1] / max(val[2], 1),
            ],
            "the epoch's scores",
        )
        for key, value in zip(("loss", "accuracy", "val_loss", "val_accuracy"), logs, strict=True):
            state.history[key].append(float(value))
        # Keras' EarlyStopping(monitor="val_loss", restore_best_weights=True), min_delta 0.
        if best_weights is None:
            best_weights = model.get_weights()
        state.wait += 1
        improved = bool(logs[2] < state.best)
        if improved:
            state.best, state.wait, best_weights = float(logs[2]), 0, model.get_weights()
        state.epoch = epoch + 1
        if checkpoint:
            checkpoint.save(stage, model, optimizer, state, improved)
        if verbose:
            seconds = time.time() - t0
            print(
                f"{config.label} epoch {epoch + 1}/{config.epochs}: loss {logs[0]:.4f} accuracy {logs[1]:.4f} "
                f"val_loss {logs[2]:.4f} val_accuracy {logs[3]:.4f} "
                f"({seconds:.1f} s, {totals[2] / max(seconds, 1e-9):.1f} img/s on {cluster.replicas} replicas)",
                file=sys.stderr,
                flush=True,
            )
        if state.wait >= config.patience and epoch > 0:
            break
    if best_weights is not None:
        model.set_weights(best_weights)
    return state


# Workers on one machine (loopback): what the tests and `leukocam bench` launch, one process per worker,
# each with its own TF_CONFIG, exactly as one command per machine would run.


def loopback_tf_config(ports: list[int], index: int, task: str = "worker") -> dict:
    """The TF_CONFIG of worker `index` in a cluster of workers on 127.0.0.1 at `ports`."""
    return {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": task, "index": index}}


def free_loopback_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (the OS picks them; bound together so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch_loopback_worker(
    ports: list[int], index: int, train_args: list[str], log: Path, cwd: str | Path, tmpdir: str | Path | None = None
) -> subprocess.Popen:
    """Start `leukocam train <train_args> --strategy multiworker` as worker `index`, its output in `log`."""
    env = {**os.environ, "TF_CONFIG": json.dumps(loopback_tf_config(ports, index)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    command = [sys.executable, "-c", "from device.cli import main; main()", "train", *train_args]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*command, "--strategy", "multiworker"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
