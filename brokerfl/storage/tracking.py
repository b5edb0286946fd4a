"""Experiment tracking: a run's metrics lines, params and final model in MLflow and TensorBoard.

The server's per-round hook (``state.on_round``) only puts the line in a bounded buffer; each
tracker has a thread of its own that sends what is buffered, and retries with a growing pause
while its tracking server is down. So a tracking server that is down or slow never holds up a
round, and ``metrics.jsonl`` stays the run's record: at the run's end every line of it that a
tracker has not taken yet is sent (for at most ``tracking.finish_timeout_s``), then the artifacts.

Every line is logged at ``step`` = its model version (one a round for synchronous strategies,
one a hop of a cyclic round, one a version of an asynchronous strategy), once: a tracker skips
the steps it already has, so a restarted server that continues the run (it finds its MLflow run
by the ``brokerfl.run`` tag) and hands the tracker the lines of ``metrics.jsonl`` again logs no
step twice. A federated evaluation's lines go under ``federated/``, beside the server's.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from brokerfl.config import ConfigError, RunConfig
from brokerfl.runtime.log import get_logger

INSTALL = "pip install 'brokerfl[tracking]'"
RUN_TAG = "brokerfl.run"
DEFAULT_EXPERIMENT = "brokerfl"
# What a line may hand a tracker: its app metrics come from the clients (attacker-controlled
# names), so names are cut to the characters MLflow accepts and their number is bounded.
MAX_METRICS_PER_LINE = 200
MAX_PARAMS = 300
MAX_PARAM_CHARS = 500
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
# Top-level fields of a line that are not numbers to plot.
_NOT_METRICS = {"sha256", "evaluation", "flower", "restored", "evaluation_error", "metrics", "server_s"}


class TrackingUnavailable(ConfigError):
    """The config asks for a tracker whose package is not installed."""


def check_tracking(config: RunConfig) -> None:
    """Raise :class:`TrackingUnavailable`, naming the extra to install, when the config's
    trackers cannot be imported: said at the start, not at the first round."""
    wanted = [
        (name, module)
        for name, module, on in (
            ("mlflow", "mlflow", config.tracking.mlflow is not None),
            ("tensorboard", "tensorboard", config.tracking.tensorboard is not None),
        )
        if on
    ]
    for name, module in wanted:
        try:
            __import__(module)
        except ImportError:
            raise TrackingUnavailable(f"tracking.{name}: the {module} package is not installed: {INSTALL}") from None


def series_of(record: dict[str, Any]) -> str:
    """The prefix of a line's metric names: '' for the server's own lines, ``federated/`` for
    a federated evaluation's, ``<kind>/`` for a Flower app's."""
    if record.get("evaluation"):
        return f"{_name(str(record['evaluation']))}/"
    if record.get("flower"):
        return f"{_name(str(record['flower']))}/"
    return ""


def step_of(record: dict[str, Any]) -> int:
    version = record.get("model_version")
    return int(version if isinstance(version, int) else record.get("round", 0))


def line_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A line's numbers by metric name, prefixed by its series: its own fields (round,
    num_updates, duration_s, the bytes, a strategy's), its app metrics (the target metric,
    loss, train_*) and the server's time by phase (``server_s/<phase>``)."""
    prefix = series_of(record)
    values: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(values) < MAX_METRICS_PER_LINE:
            values[prefix + _name(name)] = float(value)

    for name, value in record.items():
        if name not in _NOT_METRICS and name != "client_metrics":
            put(name, value)
    for name, value in (record.get("metrics") or {}).items():
        put(str(name), value)
    for phase, seconds in (record.get("server_s") or {}).items():
        put(f"server_s/{phase}", seconds)
    return values


def config_params(config: RunConfig) -> dict[str, str]:
    """The run's config, flattened to dotted keys (``strategy.name``), each value at most
    :data:`MAX_PARAM_CHARS` characters, at most :data:`MAX_PARAMS` of them; the tracking
    section is left out (it says where the run is logged, not what it is)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if len(params) >= MAX_PARAMS:
            return
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        params[_name(prefix)] = text[:MAX_PARAM_CHARS]

    walk("", config.model_dump(mode="json", exclude={"tracking"}))
    return params


def _without_password(uri: str) -> str:
    """A URI as a log shows it: no ``user:password@``."""
    return re.sub(r"//[^/@]*@", "//", uri)


def _name(name: str) -> str:
    """A name MLflow takes: its characters, at most 250 of them, and a path that is its own
    normal form (no empty, ``.`` or ``..`` part, no leading or trailing ``/``)."""
    parts = _UNSAFE.sub("_", name)[:250].split("/")
    return "/".join("_" if part in (".", "..") else part for part in parts if part) or "_"


class Sink:
    """One tracker's destination. Its methods run on the tracker's own thread only."""

    kind = "tracker"
    where = ""

    def open(self) -> None:
        """Connect, and find or make the run (may raise: retried)."""

    def logged_step(self, series: str) -> int:
        """The last step this destination holds for ``series`` (-1: none)."""
        return -1

    def log(self, lines: list[tuple[dict[str, Any], float]]) -> None:
        """Send (line, wall time) pairs, all of steps past :meth:`logged_step` (may raise: retried)."""

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        """The run's end: its artifacts, and its status."""


class MlflowSink(Sink):
    kind = "MLflow"

    def __init__(self, config: RunConfig, *, resume: bool, timeout_s: float) -> None:
        settings = config.tracking.mlflow
        assert settings is not None
        # Each request fails after timeout_s without MLflow's own minutes of retries: this
        # tracker's thread retries, and the run is never waiting for it meanwhile.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.where = _without_password(self.uri) if self.uri else "MLflow's default tracking URI"
        self.experiment = settings.experiment or DEFAULT_EXPERIMENT
        self.run_name = settings.run_name or config.run
        self.tags = {**settings.tags, RUN_TAG: config.run}
        self.params = config_params(config)
        self.brokerfl_run = config.run
        self.resume = resume
        self.client: Any = None
        self.run_id: str | None = None
        self.params_logged = False

    def open(self) -> None:
        """Find or make the run; each part done once, so a retry after a failure part-way
        makes no second run."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient(tracking_uri=self.uri)
        client = self.client
        if self.run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
            run = None
            if self.resume:  # the run a server killed meanwhile was logging goes on
                found = client.search_runs(
                    [experiment_id],
                    filter_string=f"tags.`{RUN_TAG}` = '{self.brokerfl_run}' and attributes.status = 'RUNNING'",
                    order_by=["attributes.start_time DESC"],
                    max_results=1,
                )
                run = found[0] if found else None
            if run is None:
                run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
            self.run_id = run.info.run_id
            self.params_logged = bool(run.data.params)
        if not self.params_logged:
            items = [Param(key, value) for key, value in self.params.items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(self.run_id, params=items[start : start + 100])
            self.params_logged = True

    def logged_step(self, series: str) -> int:
        history = self.client.get_metric_history(self.run_id, f"{series}model_version")
        return max((m.step for m in history), default=-1)

    def log(self, lines: list[tuple[dict[str, Any], float]]) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        metrics = [
            Metric(name, value, int(stamp * 1000), step_of(record))
            for record, stamp in lines
            for name, value in line_metrics(record).items()
        ]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            chunk = metrics[start : start + 1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise  # down, or busy: the whole batch again later
                self._log_each(chunk)  # refused: each metric alone, so one bad name loses only itself

    def _log_each(self, metrics: list[Any]) -> None:
        from mlflow.exceptions import MlflowException

        refused = []
        for metric in metrics:
            try:
                self.client.log_batch(self.run_id, metrics=[metric])
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                refused.append(metric.key)
        if refused:
            get_logger().warning(
                "tracking: MLflow refused metrics; left out", metrics=[key[:60] for key in refused[:10]]
            )

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class TensorBoardSink(Sink):
    kind = "TensorBoard"

    def __init__(self, config: RunConfig, out: Path | None, *, resume: bool) -> None:
        settings = config.tracking.tensorboard
        assert settings is not None
        # a shared log_dir holds a folder per run (tensorboard --logdir shows them side by
        # side), so a fresh run clears only its own folder
        default = (out or Path("runs") / config.run) / "tensorboard"
        self.log_dir = Path(settings.log_dir) / config.run if settings.log_dir else default
        self.where = str(self.log_dir)
        self.resume = resume
        self.writer: Any = None
        self.steps: dict[str, int] = {}

    def open(self) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for path in self.log_dir.glob("events.out.tfevents.*"):
            if self.resume:
                try:
                    self._read_steps(path)
                except Exception as exc:  # noqa: BLE001 - a file a killed process tore: its steps are not known
                    get_logger().warning(
                        "tracking: an event file could not be read; its steps may be written again",
                        file=str(path),
                        error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    )
            else:  # a fresh run: no curve of an earlier one under the same name (as metrics.jsonl)
                path.unlink()
        self.writer = EventFileWriter(str(self.log_dir))

    def _read_steps(self, path: Path) -> None:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag.endswith("model_version"):
                    series = value.tag.removesuffix("model_version")
                    self.steps[series] = max(self.steps.get(series, -1), event.step)

    def logged_step(self, series: str) -> int:
        return self.steps.get(series, -1)

    def log(self, lines: list[tuple[dict[str, Any], float]]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        for record, stamp in lines:
            values = [Summary.Value(tag=name, simple_value=value) for name, value in line_metrics(record).items()]
            self.writer.add_event(Event(wall_time=stamp, step=step_of(record), summary=Summary(value=values)))
        self.writer.flush()

    def finish(self, artifacts: list[Path], failed: bool) -> None:
        self.writer.close()


class _SinkThread:
    """One sink's buffer and the thread that empties it, retrying while the sink fails."""

    RETRY_FIRST_S = 1.0
    RETRY_MAX_S = 15.0

    def __init__(self, sink: Sink, buffer: int, log: Any) -> None:
        self.sink = sink
        self.log = log
        self.buffer = buffer
        self.pending: list[tuple[dict[str, Any], float]] = []  # put, not yet taken by the thread
        self.held: list[tuple[dict[str, Any], float]] = []  # taken, not yet sent (the thread's own)
        self.overflowed = False
        self.cond = threading.Condition()
        self.closing: tuple[list[Path], bool] | None = None
        self.done = threading.Event()
        self.opened = False
        self.steps: dict[str, int] = {}  # per series: the last step the sink holds
        self.failing = False
        self.thread = threading.Thread(target=self._run, name=f"tracking-{sink.kind}", daemon=True)
        self.thread.start()

    def unsent(self) -> int:
        return len(self.pending) + len(self.held)

    def put(self, lines: Iterable[tuple[dict[str, Any], float]]) -> None:
        with self.cond:
            self.pending.extend(lines)
            if len(self.pending) > self.buffer:
                del self.pending[: len(self.pending) - self.buffer]
                self._overflow()
            self.cond.notify()

    def _overflow(self) -> None:
        if not self.overflowed:
            self.overflowed = True
            self.log.warning(
                f"tracking: {self.sink.kind} buffer full; the oldest lines wait for the run's end", buffer=self.buffer
            )

    def close(self, lines: list[tuple[dict[str, Any], float]], artifacts: list[Path], failed: bool) -> None:
        """Hand over the run's every line (those already sent are skipped), then finish."""
        with self.cond:
            self.pending.extend(lines)  # unbounded now: the run's end sends what the buffer dropped
            self.closing = (artifacts, failed)
            self.cond.notify()

    def _run(self) -> None:
        pause = self.RETRY_FIRST_S
        closing: tuple[list[Path], bool] | None = None
        while True:
            with self.cond:
                while not self.pending and not self.held and self.closing is None:
                    self.cond.wait()
                self.held.extend(self.pending)
                self.pending = []
                if self.closing is not None and closing is None:  # the run's end: try at once, and often
                    pause = self.RETRY_FIRST_S
                closing = self.closing
            if closing is None and len(self.held) > self.buffer:  # while the sink fails
                del self.held[: len(self.held) - self.buffer]
                self._overflow()
            try:
                if not self.opened:
                    self.sink.open()
                    self.opened = True
                self._send(self.held)
                self.held = []
                if closing is not None:
                    with self.cond:
                        if self.pending:
                            continue
                    self.sink.finish(*closing)
                    self.done.set()
                    return
                if self.failing:
                    self.failing = False
                    self.log.info(f"tracking: {self.sink.kind} at {self.sink.where} answers again")
                pause = self.RETRY_FIRST_S
            except Exception as exc:  # noqa: BLE001 - a tracker's failure never stops the run
                if not self.failing:
                    self.failing = True
                    self.log.warning(
                        f"tracking: {self.sink.kind} at {self.sink.where} failed; retrying in the background "
                        "(the run goes on; metrics.jsonl keeps every line)",
                        error=f"{type(exc).__name__}: {str(exc)[:300]}",
                    )
                with self.cond:
                    self.cond.wait(pause)
                pause = min(pause * 2, self.RETRY_MAX_S)

    def _send(self, batch: list[tuple[dict[str, Any], float]]) -> None:
        """Send the lines of ``batch`` whose step the sink does not hold."""
        fresh = []
        for record, stamp in batch:
            series = series_of(record)
            if series not in self.steps:
                self.steps[series] = self.sink.logged_step(series)
            if step_of(record) > self.steps[series]:
                fresh.append((record, stamp))
                self.steps[series] = step_of(record)
        if fresh:
            try:
                self.sink.log(fresh)
            except BaseException:
                for record, _ in fresh:  # not sent: ask the sink what it holds next time
                    self.steps.pop(series_of(record), None)
                raise


class Tracker:
    """The run's trackers. Call it with each metrics line (it is a ``state.on_round`` hook);
    :meth:`finish` at the run's end."""

    def __init__(self, sinks: list[Sink], *, buffer: int = 10_000, finish_timeout_s: float = 60.0) -> None:
        self.log = get_logger()
        self.finish_timeout_s = finish_timeout_s
        self.threads = [_SinkThread(sink, buffer, self.log) for sink in sinks]

    def __call__(self, record: dict[str, Any]) -> None:
        line = (dict(record), time.time())
        for thread in self.threads:
            thread.put([line])

    def catch_up(self, records: Iterable[dict[str, Any]]) -> None:
        """Lines written before this process tracked them (a restarted server's metrics.jsonl)."""
        now = time.time()
        lines = [(dict(record), now) for record in records]
        for thread in self.threads:
            thread.put(lines)

    def finish(
        self, records: Iterable[dict[str, Any]], artifacts: Iterable[Path] = (), *, failed: bool = False
    ) -> bool:
        """Send what is left of ``records`` (the run's metrics lines) and the ``artifacts``
        that exist; wait at most ``finish_timeout_s``. True if every tracker finished."""
        now = time.time()
        lines = [(dict(record), now) for record in records]
        present = [Path(p) for p in artifacts if Path(p).is_file()]
        for thread in self.threads:
            thread.close(lines, present, failed)
        deadline = time.monotonic() + self.finish_timeout_s
        finished = True
        for thread in self.threads:
            if not thread.done.wait(max(0.0, deadline - time.monotonic())):
                finished = False
                self.log.warning(
                    f"tracking: {thread.sink.kind} at {thread.sink.where} did not take the run's end within "
                    f"{self.finish_timeout_s:g} s; metrics.jsonl has every line",
                    unsent=thread.unsent(),
                )
        return finished


def open_tracking(config: RunConfig, out: Path | None, *, resume: bool) -> Tracker | None:
    """The trackers the config asks for (None: none). ``resume``: the run goes on from an
    earlier process's (a restarted server), so its MLflow run and event files go on too."""
    tracking = config.tracking
    if tracking.mlflow is None and tracking.tensorboard is None:
        return None
    check_tracking(config)
    sinks: list[Sink] = []
    if tracking.mlflow is not None:
        sinks.append(MlflowSink(config, resume=resume, timeout_s=tracking.timeout_s))
    if tracking.tensorboard is not None:
        sinks.append(TensorBoardSink(config, out, resume=resume))
    return Tracker(sinks, buffer=tracking.buffer, finish_timeout_s=tracking.finish_timeout_s)
