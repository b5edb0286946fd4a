"""How far a round is from the wire: brokerfl's seconds per round next to the time raw pika
needs to move the same round's bytes with the same durability, measured in the same run.

    python benchmarks/round_floor.py [--sizes 100k 10M] [--rounds 8] [--clients 4] [--no-journal] [--repeat 5]

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
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from round_time import HIDDEN, parameter_count, run_federation, summarise  # noqa: E402

from brokerfl.memory import tune_allocator  # noqa: E402
from brokerfl.transports.amqp import _tune_reads  # noqa: E402

CHUNK = 16 * 1024**2
GOAL = 1.3
OVERHEAD = 4096  # msgpack header and alignment of a TrainTask / ParameterUpdate body, about


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
        channel.basic_publish(exchange, key, part, pika.BasicProperties(delivery_mode=2, headers={"chunk": f"{index}/{count}"}), mandatory=True)


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


def measure_floor(url: str, params: int, clients: int, journal: bool, repeat: int) -> list[float]:
    """Seconds per raw-pika round (warm-up round dropped)."""
    run = f"bench-floor-{uuid.uuid4().hex[:8]}"
    exchange, server_queue, stream = run, f"{run}.server", f"{run}.journal"
    client_queues = [f"{run}.client.{i}" for i in range(clients)]
    task_bytes = update_bytes = params * 4 + OVERHEAD
    # the clients fork before this process opens its connection (a forked socket is shared)
    ready = mp.get_context("fork").Event()
    procs = [mp.get_context("fork").Process(target=_client, args=(url, exchange, q, repeat + 1, task_bytes, update_bytes, ready)) for q in client_queues]
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
        admin.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream", "x-max-length-bytes": 2 * 1024**3})
        admin.queue_bind(stream, exchange, "#")
    try:
        pub = conn.channel()
        pub.confirm_delivery()
        con = conn.channel()
        task = os.urandom(task_bytes)
        chunks_per_round = clients * max(1, -(-update_bytes // CHUNK))
        ready.set()
        times = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            _publish(pub, exchange, "clients.train_task", task)
            _consume(conn, con, server_queue, chunks_per_round)
            times.append(time.perf_counter() - start)
        for p in procs:
            p.join(timeout=60)
        return times[1:]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for q in [server_queue, *client_queues, *([stream] if journal else [])]:
            admin.queue_delete(q)
        admin.exchange_delete(exchange)
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100k", "10M"], choices=sorted(HIDDEN))
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each brokerfl federation")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="timed raw rounds per floor measurement")
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    tune_allocator()
    journal = not args.no_journal
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            params = parameter_count(HIDDEN[size])
            floor = measure_floor(args.broker, params, args.clients, journal, args.repeat)
            records = run_federation(size, rounds=args.rounds, clients=args.clients, url=args.broker, journal=journal, workdir=Path(tmp))
            floor += measure_floor(args.broker, params, args.clients, journal, args.repeat)
            result = summarise(size, records)
            floor_median, floor_best = statistics.median(floor), min(floor)
            ratio = result["median_round_s"] / floor_median
            verdict = f"  (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})" if size == "10M" else ""
            load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
            lines.append(
                f"{size:>5} ({params:,} parameters), {args.clients} clients, journal {'on' if journal else 'off'}: brokerfl median {result['median_round_s']:.3f} s per round "
                f"over {result['rounds'] - 1} rounds; raw-pika floor median {floor_median:.3f} s (best {floor_best:.3f}) over {len(floor)} rounds; "
                f"round / floor {ratio:.2f}x{verdict}; load {load}\n"
                f"       server phases per round (median s): {result['server_phases_s']}\n"
                f"       client training per round (median s): {result['client_train_s']}"
            )
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
