"""How far a round is from the wire: brokerfl's seconds per round next to the time raw pika
needs to move the same round's bytes with the same durability, measured in the same run.

    python benchmarks/round_floor.py [--sizes 100k 10M] [--rounds 8] [--clients 4] [--no-journal] [--repeat 5]
        [--model-transfer auto|reference|inline]

For each size, alternating (floor, federation, floor):

- **floor**: one process plays the server and ``--clients`` processes the clients, with raw
  pika and brokerfl's socket reads (512 KiB, ``_tune_reads``). A round: the server publishes
  one task body (the size of brokerfl's TrainTask: the model) to a durable topic exchange
  that routes it to every client's durable queue, persistent, ``mandatory``, confirmed,
  chunked at 16 MiB like brokerfl; each client consumes it, acks, and publishes one update
  body (the size of brokerfl's ParameterUpdate) to the quorum server queue, persistent,
  confirmed, chunked; the server consumes and acks them all. With the journal on, a stream
  bound to ``#`` takes a copy of everything, as brokerfl's journal does. No training, no
  encoding, no hashing: bytes only. Timed from the task's first publish to the last
  update's ack, best and median of ``--repeat`` rounds (after a warm-up round).
- **brokerfl**: ``benchmarks/round_time.py``'s federation (one server process and
  ``--clients`` client processes, one local batch per round): the median seconds per round.

It prints both, their ratio (goal: the 10M round <= 1.3x its floor), and the server's
phases, where ``evaluate`` should no longer show up in the 100k round time (it runs after the
next task is out: see ``handlers/workflows/server.py``).

And the CPU each spends per round, steady state (from /proc, Linux): the benchmark's
processes (the floor's pika server and clients; brokerfl's server and clients) and the
broker's (its OS process, found with ``rabbitmqctl -n NODE status``: ``--node`` must be the
node behind ``--broker``), and how many of the machine's cores that keeps busy. Where the
floor already keeps most cores busy, whatever brokerfl computes on top (training,
evaluation, fold, hashes) lengthens the round by about its CPU over the cores left.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from round_time import HIDDEN, parameter_count, run_federation, summarise  # noqa: E402

from brokerfl.transports.amqp import _tune_reads  # noqa: E402
from brokerfl.transports.memory import tune_allocator  # noqa: E402

CHUNK = 16 * 1024**2
GOAL = 1.3
OVERHEAD = 4096  # msgpack header and alignment of a TrainTask / ParameterUpdate body, about


def cpu_seconds(pid: int | str | None) -> float:
    """User + system CPU a live process (or ``PID/task/TID``: thread) has used so far
    (Linux /proc); 0 for none or gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU of each live thread of a process so far, by thread id."""
    threads = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return threads
    for tid in tids:
        threads[tid] = cpu_seconds(f"{pid}/task/{tid}")
    return threads


def broker_pid(node: str) -> int | None:
    """The OS process of RabbitMQ node ``node`` on this machine (None: no rabbitmqctl, or
    the node does not answer)."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "-n", node, "status", "--formatter", "json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        pid = int(json.loads(out.stdout)["pid"])
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


@dataclass
class CpuPerRound:
    per_process: list[float]  # the server's, then each client's: s of CPU per round
    broker: float | None  # the broker's, s of CPU per round (None: its process was not found)
    wall: float  # s per round over the same span
    server_threads: list[float]  # the server's threads, busiest first: s of CPU per round

    def __str__(self) -> str:
        processes = sum(self.per_process)
        broker = "n/a (see --node)" if self.broker is None else f"{self.broker:.3f}"
        total = processes + (self.broker or 0.0)
        server, *clients = self.per_process
        threads = " ".join(f"{t:.3f}" for t in self.server_threads if t >= 0.001)
        return (
            f"processes {processes:.3f} (server {server:.3f} [threads {threads}], clients "
            f"{' '.join(f'{c:.3f}' for c in clients)}) + broker {broker} "
            f"= {total:.3f} s over {self.wall:.3f} s ({total / self.wall:.2f} cores busy)"
        )


class CpuMeter:
    """CPU of the server and client processes, and of the broker, between two snapshots."""

    def __init__(self, pids: list[int], broker: int | None) -> None:
        self.pids, self.broker = pids, broker  # the server's pid first

    def snapshot(self) -> tuple[list[float], float, float, dict[int, float]]:
        return (
            [cpu_seconds(pid) for pid in self.pids],
            cpu_seconds(self.broker),
            time.perf_counter(),
            thread_cpu_seconds(self.pids[0]),
        )

    def per_round(self, start: tuple, end: tuple, rounds: int) -> CpuPerRound:
        threads = sorted(((cpu - start[3].get(tid, 0.0)) / rounds for tid, cpu in end[3].items()), reverse=True)
        return CpuPerRound(
            [(b - a) / rounds for a, b in zip(start[0], end[0], strict=True)],
            None if self.broker is None else (end[1] - start[1]) / rounds,
            (end[2] - start[2]) / rounds,
            threads,
        )


def meter_federation(broker: int | None, rounds: int, result: list[CpuPerRound]):
    """A ``watch`` for ``run_federation``: meters the CPU between the server's first metrics
    line (round 1, start-up included, is left out as in the round times) and its last."""

    def watch(pids: list[int], out: Path) -> None:
        def follow() -> None:
            meter, start, metrics = CpuMeter(pids, broker), None, out / "metrics.jsonl"
            deadline = time.monotonic() + 60 + 30 * rounds
            while time.monotonic() < deadline:
                try:
                    lines = metrics.read_bytes().count(b"\n")
                except OSError:
                    lines = 0
                if start is None and lines >= 1:
                    start = meter.snapshot()
                if start is not None and lines >= rounds:
                    result.append(meter.per_round(start, meter.snapshot(), rounds - 1))
                    return
                time.sleep(0.01)  # a poll of the metrics file: the rounds take 0.03-2 s

        threading.Thread(target=follow, daemon=True, name="cpu-meter").start()

    return watch


def _connect(url: str) -> pika.BlockingConnection:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    _tune_reads(conn)
    return conn


def _publish(channel, exchange: str, key: str, body: bytes) -> None:
    """Chunked at 16 MiB like brokerfl, persistent, mandatory, each chunk confirmed."""
    view = memoryview(body)
    count = max(1, -(-len(body) // CHUNK))
    for index in range(count):
        part = body if count == 1 else bytes(view[index * CHUNK : (index + 1) * CHUNK])
        channel.basic_publish(
            exchange,
            key,
            part,
            pika.BasicProperties(delivery_mode=2, headers={"chunk": f"{index}/{count}"}),
            mandatory=True,
        )


def _consume(conn, channel, queue: str, messages: int, on_all=None) -> None:
    """Consume and ack ``messages`` AMQP messages (chunks) from ``queue``."""
    seen = 0

    def on_message(ch, method, properties, body) -> None:
        nonlocal seen
        seen += 1
        ch.basic_ack(method.delivery_tag)

    channel.basic_qos(prefetch_count=16)
    tag = channel.basic_consume(queue, on_message)
    while seen < messages:
        conn.process_data_events(time_limit=1.0)
    channel.basic_cancel(tag)


def _client(url: str, exchange: str, queue: str, rounds: int, task_bytes: int, update_bytes: int, ready) -> None:
    tune_allocator()
    conn = _connect(url)
    pub = conn.channel()
    pub.confirm_delivery()
    con = conn.channel()
    update = os.urandom(update_bytes)
    ready.wait()
    for _ in range(rounds):
        _consume(conn, con, queue, max(1, -(-task_bytes // CHUNK)))
        _publish(pub, exchange, "server.parameter_update", update)
    conn.close()


def measure_floor(
    url: str, params: int, clients: int, journal: bool, repeat: int, broker: int | None = None
) -> tuple[list[float], CpuPerRound]:
    """Seconds per raw-pika round (warm-up round dropped), and the CPU per timed round."""
    run = f"bench-floor-{uuid.uuid4().hex[:8]}"
    exchange, server_queue, stream = run, f"{run}.server", f"{run}.journal"
    client_queues = [f"{run}.client.{i}" for i in range(clients)]
    task_bytes = update_bytes = params * 4 + OVERHEAD
    # the clients fork before this process opens its connection (a forked socket is shared)
    ready = mp.get_context("fork").Event()
    procs = [
        mp.get_context("fork").Process(
            target=_client, args=(url, exchange, q, repeat + 1, task_bytes, update_bytes, ready)
        )
        for q in client_queues
    ]
    for p in procs:
        p.start()
    conn = _connect(url)
    admin = conn.channel()
    admin.exchange_declare(exchange, exchange_type="topic", durable=True)
    admin.queue_declare(server_queue, durable=True, arguments={"x-queue-type": "quorum"})
    admin.queue_bind(server_queue, exchange, "server.#")
    for i, q in enumerate(client_queues):
        admin.queue_declare(q, durable=True)
        admin.queue_bind(q, exchange, f"client.{i}.#")
        admin.queue_bind(q, exchange, "clients.#")
    if journal:
        admin.queue_declare(
            stream, durable=True, arguments={"x-queue-type": "stream", "x-max-length-bytes": 2 * 1024**3}
        )
        admin.queue_bind(stream, exchange, "#")
    try:
        pub = conn.channel()
        pub.confirm_delivery()
        con = conn.channel()
        task = os.urandom(task_bytes)
        chunks_per_round = clients * max(1, -(-update_bytes // CHUNK))
        ready.set()
        times = []
        meter = CpuMeter([os.getpid(), *(p.pid for p in procs)], broker)
        for _ in range(repeat + 1):
            start = time.perf_counter()
            _publish(pub, exchange, "clients.train_task", task)
            _consume(conn, con, server_queue, chunks_per_round)
            times.append(time.perf_counter() - start)
            if len(times) == 1:
                after_warm_up = meter.snapshot()
        cpu = meter.per_round(after_warm_up, meter.snapshot(), repeat)
        for p in procs:
            p.join(timeout=60)
        return times[1:], cpu
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for q in [server_queue, *client_queues, *([stream] if journal else [])]:
            admin.queue_delete(q)
        admin.exchange_delete(exchange)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["100k", "10M"], choices=sorted(HIDDEN))
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each brokerfl federation")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="timed raw rounds per floor measurement")
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument(
        "--model-transfer",
        default="auto",
        choices=["auto", "reference", "inline"],
        help=(
            "how brokerfl's tasks carry the model (config model_transfer); the floor sends it inline, to each client's "
            "queue"
        ),
    )
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument(
        "--node",
        default=os.environ.get("BROKERFL_RABBITMQ_NODE", "rabbit@localhost"),
        help="the RabbitMQ node behind --broker, for its CPU",
    )
    args = parser.parse_args()
    tune_allocator()
    journal = not args.no_journal
    broker = broker_pid(args.node)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            params = parameter_count(HIDDEN[size])
            floor, floor_cpu = measure_floor(args.broker, params, args.clients, journal, args.repeat, broker)
            federation_cpu: list[CpuPerRound] = []
            records = run_federation(
                size,
                rounds=args.rounds,
                clients=args.clients,
                url=args.broker,
                journal=journal,
                workdir=Path(tmp),
                model_transfer=args.model_transfer,
                watch=meter_federation(broker, args.rounds, federation_cpu),
            )
            more, more_cpu = measure_floor(args.broker, params, args.clients, journal, args.repeat, broker)
            floor += more
            result = summarise(size, records)
            floor_median, floor_best = statistics.median(floor), min(floor)
            ratio = result["median_round_s"] / floor_median
            verdict = f"  (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})" if size == "10M" else ""
            load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
            lines.append(
                f"{size:>5} ({params:,} parameters), {args.clients} clients, journal {'on' if journal else 'off'}, "
                f"model_transfer {args.model_transfer}: brokerfl median {result['median_round_s']:.3f} s per round "
                f"over {result['rounds'] - 1} rounds; raw-pika floor median {floor_median:.3f} s (best "
                f"{floor_best:.3f}) over {len(floor)} rounds; "
                f"round / floor {ratio:.2f}x{verdict}; load {load}\n"
                f"       server phases per round (median s): {result['server_phases_s']}\n"
                f"       client training per round (median s): {result['client_train_s']}\n"
                f"       CPU per round, floor: {floor_cpu}; {more_cpu}\n"
                "       CPU per round, brokerfl: "
                f"{federation_cpu[0] if federation_cpu else 'not metered (no metrics line seen)'}"
            )
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
