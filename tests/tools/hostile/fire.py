"""A federation under fire: a digits FedAvg run over RabbitMQ while hostile messages are
published to its server queue, then accounting and replay; what the run did with each
hostile message (for the hostile-input test and ``benchmarks/hostile.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from brokerfl.transports.amqp import chunks
from brokerfl.transports.topology import RunTopology
from tests.tools.hostile.messages import CHUNK, DEAD, DEAD_ANONYMOUS, REFUSED, HostileMessage, hostile_messages
from tests.tools.hostile.publisher import HostilePublisher


@dataclass
class FireResult:
    """What :func:`run_under_fire` saw."""

    server_exit: int
    client_exit: int
    seconds: float
    rounds: list[dict[str, Any]]  # the server's metrics lines
    peak_rss_mib: float  # the server process's VmHWM
    sent: list[HostileMessage]  # hostile messages the broker took
    refused_by_broker: int
    accounting_exit: int
    accounting: str
    replay_exit: int
    replay: str
    folded_hostile: list[str]  # hostile ids in stored versions (must be none)
    unanswered: dict[str, list[str]]  # expectation -> hostile ids with no dead letter or drop record
    dead_letters: int
    drop_records: int
    log_bytes: int
    longest_log_line: int

    @property
    def accuracy(self) -> float:
        return self.rounds[-1]["accuracy"] if self.rounds else float("nan")


def _peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


UNTIL_TOLD = 10_000  # rounds of a run under fire until set-rounds ends it


def _end_after(url: str, topology: RunTopology, rounds: int, server: Any) -> None:
    """Set the run's rounds (it ends at ``rounds``, or at the round under way if later)."""
    import time

    from brokerfl.runtime.operator_commands import SetRounds, StatusRequest, ask
    from brokerfl.transports.amqp import AmqpTransport

    deadline = time.monotonic() + 120
    with AmqpTransport(url) as transport:
        while server.poll() is None and time.monotonic() < deadline:
            # rounds below the round under way are refused: ask which that is (it may move on
            # before the command arrives, and then the command is refused and sent again)
            status = ask(transport, topology, StatusRequest(), timeout=10)
            under_way = status.status.get("round", 0) if status is not None else 0
            reply = ask(transport, topology, SetRounds(rounds=max(rounds, under_way)), timeout=10)
            if reply is not None and reply.ok:
                return
    raise RuntimeError("the server did not take set-rounds")


def run_under_fire(
    url: str,
    workdir: Any,
    *,
    run: str,
    rounds: int,
    clients: int,
    hostile: int,
    spread_s: float = 10.0,
    seed: int = 0,
    epochs: int = 3,
    timeout_s: float = 900.0,
) -> FireResult:
    """A digits FedAvg run (server and one process of ``clients`` logical clients, over
    RabbitMQ at ``url``) while ``hostile`` messages are published to its server queue over
    ``spread_s`` seconds; then ``brokerfl accounting`` and ``brokerfl replay --check``.
    The run's queues are deleted at the end.

    Under fire the run trains at least ``rounds`` rounds and ends only once every hostile
    message is in its server queue (an admin ``set-rounds`` sent after the last one, which
    the server reads after them): a run that ended mid-fire would leave the rest unread,
    and whether it does would depend on the machine's speed."""
    import json
    import subprocess
    import sys
    import threading
    import time
    from collections import Counter
    from pathlib import Path

    import pika

    from brokerfl.handlers.trainer import init_parameters
    from brokerfl.storage.journal import read_journal
    from brokerfl.storage.store import DirectoryModelStore
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.base import REASON_HEADER
    from brokerfl.wire.message import UpdateDropped, from_wire

    root = Path(__file__).resolve().parents[2]  # the repository (tests/tools/hostile/fire.py)
    workdir = Path(workdir)
    config = {
        "run": run,
        "seed": seed,
        "rounds": rounds if not hostile else UNTIL_TOLD,
        "clients": clients,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"hidden": [128, 64]},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "strategy": {"name": "fedavg", "min_clients": clients, "round_deadline_s": 120},
    }
    path = workdir / f"{run}.yaml"
    path.write_text(json.dumps(config))
    out = workdir / run
    log_path = workdir / f"{run}.server.log"
    env = {**os.environ, "BROKERFL_AMQP_URL": url}
    common = [str(path), "--log-level", "warning"]
    topology = RunTopology(run)
    started = time.monotonic()
    with open(log_path, "w") as log, open(workdir / f"{run}.clients.log", "w") as client_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(out)],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        peak = [0.0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set() and server.poll() is None:
                peak[0] = max(peak[0], _peak_rss_mib(server.pid) or 0.0)
                stop.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", f"0-{clients - 1}"],
            cwd=root,
            env=env,
            stdout=client_log,
            stderr=subprocess.STDOUT,
        )
        sent: list[HostileMessage] = []
        publisher = None
        try:
            if hostile:
                deadline = time.monotonic() + 120
                while True:  # the server declares its queue, then (holding the role) consumes it
                    consuming = False
                    try:
                        probe = pika.BlockingConnection(pika.URLParameters(url))
                        consuming = (
                            probe.channel().queue_declare(topology.server_queue, passive=True).method.consumer_count > 0
                        )
                        probe.close()
                    except pika.exceptions.AMQPError:
                        pass
                    if consuming:
                        break
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("the server did not consume its queue") from None
                    time.sleep(0.2)
                shapes = {k: v.shape for k, v in init_parameters(64, [128, 64], 10, seed=0).items()}
                publisher = HostilePublisher(url, topology)
                begin = time.monotonic()
                for i, message in enumerate(
                    hostile_messages(
                        hostile,
                        run=run,
                        client_ids=[str(c) for c in range(clients)],
                        shapes=shapes,
                        seed=seed,
                        rounds=rounds,
                    )
                ):
                    if publisher.publish(message):
                        sent.append(message)
                    if i % 100 == 99:
                        publisher.sync()
                        ahead = begin + spread_s * (i + 1) / hostile - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)
                publisher.sync()
                _end_after(url, topology, rounds, server)
            server.wait(timeout_s)
            client.wait(60)
        finally:
            stop.set()
            for proc in (server, client):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if publisher is not None:
                publisher.close()
    seconds = time.monotonic() - started
    peak[0] = max(peak[0], 0.0)

    def cli(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", *args, str(path)]
            + ([] if args[0] == "replay" else ["--out", str(out)]),
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return done.returncode, done.stdout + done.stderr

    accounting_exit, accounting = cli("accounting")
    replay_exit, replay = cli("replay", "--check")

    # What became of each hostile message: its dead letters (the dead queue holds them all:
    # the transport's own, of chunks, go there straight) and drop records (in the journal).
    dead: Counter[str] = Counter()
    anonymous = 0
    dropped: set[str] = set()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    while True:
        method, properties, _ = channel.basic_get(topology.dead_queue, auto_ack=True)
        if method is None:
            break
        dead[properties.message_id or ""] += 1
        anonymous += "cannot be decoded" in str((properties.headers or {}).get(REASON_HEADER, ""))
    connection.close()
    with AmqpTransport(url) as transport:
        for d in read_journal(transport, topology):
            if d.routing_key == f"audit.{UpdateDropped.TYPE}" and not d.problem:
                try:
                    dropped.add(from_wire(d.envelope, d.body).update_id)
                except Exception:  # a forged record on an audit key: not the server's
                    pass
        topology.delete(transport, [str(c) for c in range(clients)])
    store = DirectoryModelStore(out / "models")
    folded = {uid for v in store.versions() for uid in store.metadata(v)["update_ids"]}
    hostile_ids = {m.message_id for m in sent if m.message_id}
    unanswered: dict[str, list[str]] = {}
    chunk_sets: dict[str, int] = {}
    for m in sent:
        if m.expect == DEAD and dead[m.message_id] == 0:
            unanswered.setdefault(DEAD, []).append(m.message_id)
        elif m.expect == REFUSED and dead[m.message_id] == 0 and m.message_id not in dropped:
            unanswered.setdefault(REFUSED, []).append(m.message_id)
        elif m.expect == CHUNK:
            chunk_sets[m.message_id] = m.set_size
    expected_anonymous = sum(m.expect == DEAD_ANONYMOUS for m in sent)
    if anonymous < expected_anonymous:
        unanswered[DEAD_ANONYMOUS] = [f"{expected_anonymous - anonymous} of {expected_anonymous}"]
    # A never-finished set still within its chunk timeout when the server stops is not
    # dead-lettered yet (its chunks go back to the queue): at most max_partial_messages of them.
    held = [mid for mid, size in chunk_sets.items() if dead[mid] < size]
    if len(held) > chunks.MAX_PARTIALS:
        unanswered[CHUNK] = held
    text = log_path.read_text(errors="replace")
    from brokerfl.storage.metrics_log import read_metrics

    metrics = out / "metrics.jsonl"
    return FireResult(
        server.returncode,
        client.returncode,
        seconds,
        read_metrics(metrics) if metrics.exists() else [],
        peak[0],
        sent,
        publisher.refused if publisher else 0,
        accounting_exit,
        accounting,
        replay_exit,
        replay,
        sorted(folded & hostile_ids),
        unanswered,
        sum(dead.values()),
        len(dropped & hostile_ids),
        len(text.encode()),
        max((len(line) for line in text.splitlines()), default=0),
    )
