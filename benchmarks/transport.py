"""A round's update bytes moved through brokerfl against raw pika, side by side in one run.

    python benchmarks/transport.py [--sizes 100000 10000000] [--clients 4] [--repeat 3]
                                   [--no-journal] [--profile] [--default-malloc]

A round's updates are ``--clients`` ParameterUpdate messages, each carrying a model state of
``--params`` float32 parameters. For each size, in one process, alternating, ``--repeat``
times (after one untimed warm-up round each):

- ``brokerfl``: :class:`AmqpTransport` + ``RunTopology(run, journal=False)``. One transport
  publishes the N updates to ``server.parameter_update`` the way a client worker does
  (``to_wire_parts`` + ``transport.publish``, confirmed, chunked above 16 MiB: each chunk is
  copied once straight from the encoded body's buffers, the tensors); then a second
  transport consumes them from the (quorum) server queue with prefetch 16 as the server does,
  ``from_wire`` (zero-copy) and acks each. Timed from the first ``to_wire`` to the last ack.
- ``brokerfl+journal``: the same with ``journal=True`` (a stream bound to ``#`` also takes
  every message, so the broker writes the bytes twice).
- ``raw``: pika alone with the same durability and the same socket settings: a durable topic
  exchange, a durable quorum queue bound to ``server.#``, persistent messages
  (delivery_mode=2), ``mandatory``, publisher confirms (pika's BlockingChannel waits for each
  confirm, as brokerfl does), the 512 KiB socket reads brokerfl sets on its connections
  (``_tune_reads``; pika reads 4 KiB at a time by default), the very same body bytes
  (brokerfl-encoded beforehand, outside the timing), split into 16 MiB chunks like brokerfl
  (``bytes(memoryview[...])``, inside the timing: pika takes only bytes, and RabbitMQ 3.x
  refuses messages over 128 MiB); then basic_consume with prefetch 16 and a manual ack per
  AMQP message, bodies kept until the round ends. No reassembly, no hash, no decode. Timed
  from the first publish to the last ack. This is the like-for-like baseline (``vs raw``).
- ``raw+stream``: the same with a stream bound to ``#`` with the journal's retention (the
  baseline for the journal).
- ``raw-4k``: ``raw`` with pika's default 4 KiB socket reads (the weaker baseline, printed
  for reference as ``vs 4k``).

The process tunes malloc as brokerfl's CLI does (:func:`brokerfl.transports.memory.tune_allocator`), for
every path alike; ``--default-malloc`` keeps glibc's defaults.
Each path's rounds also report ``cpu``: this process's CPU seconds (publisher and consumer,
not the broker's), which the load of other processes sways far less than seconds do.
The order of the paths rotates from round to round. Publishing finishes before consuming starts (one process, one
thread, blocking pika), for
both. Every queue and exchange is uniquely named and deleted at the end, also on error.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import signal
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brokerfl.transports.amqp import (  # noqa: E402
    AmqpTransport,
    _tune_reads,
    chunks,  # noqa: E402
)
from brokerfl.transports.base import body_size  # noqa: E402
from brokerfl.transports.memory import allocator_mode, tune_allocator  # noqa: E402
from brokerfl.transports.topology import RunTopology, routing_key  # noqa: E402
from brokerfl.wire.message import ParameterUpdate, from_wire, to_wire, to_wire_parts  # noqa: E402

CHUNK = 16 * 1024**2
ROUND_TIMEOUT = 300.0  # a round's consume that takes longer fails the run (e.g. the broker was reset meanwhile)
PREFETCH = 16
GOAL = 0.9


def make_updates(params: int, clients: int, run: str) -> list[ParameterUpdate]:
    """N updates, each a state of ``params`` float32 values in a few tensors."""
    rng = np.random.default_rng(0)
    sizes = [params // 2, params // 4, params // 8]
    sizes.append(params - sum(sizes))
    updates = []
    for i in range(clients):
        state = {f"layer{k}.weight": rng.standard_normal(n, dtype=np.float32) for k, n in enumerate(sizes)}
        updates.append(
            ParameterUpdate(
                client_id=str(i), task_id="t", parameters=state, num_samples=100, sender=f"client.{i}", run=run
            )
        )
    return updates


_PHASES: dict[str, float] = defaultdict(float)  # filled by the wrappers below


def _instrument() -> None:
    """Time brokerfl's chunk work from outside: ``split`` (the copy of each chunk, and waiting
    for the body's hash) and ``Assembler._finish`` (waiting for the hash, then the join)."""
    split, finish = chunks.split, chunks.Assembler._finish

    def timed_split(*args, **kwargs):
        parts = split(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(parts)
            except StopIteration:
                return
            finally:
                _PHASES["split"] += time.perf_counter() - start
            yield item

    def timed_finish(self, partial):
        start = time.perf_counter()
        try:
            return finish(self, partial)
        finally:
            _PHASES["reassemble"] += time.perf_counter() - start

    chunks.split = timed_split
    chunks.Assembler._finish = timed_finish


class Brokerfl:
    def __init__(self, url: str, params: int, clients: int, journal: bool) -> None:
        self.name = "brokerfl+journal" if journal else "brokerfl"
        self.topology = RunTopology(f"bench-transport-{uuid.uuid4().hex[:10]}", journal=journal)
        self.updates = make_updates(params, clients, self.topology.run)
        self.key = routing_key("server", ParameterUpdate.TYPE)
        self.url = url
        self.client = AmqpTransport(url)
        self.server = AmqpTransport(url)
        self.topology.declare(self.server)
        self.nbytes = sum(body_size(to_wire_parts(u)[1]) for u in self.updates)

    def round(self) -> dict[str, float]:
        phases: dict[str, float] = defaultdict(float)
        _PHASES.clear()
        got: dict[str, ParameterUpdate] = {}  # by id: a reconnect redelivers (at-least-once)
        t0 = time.perf_counter()
        for u in self.updates:
            a = time.perf_counter()
            envelope, body = to_wire_parts(u)
            b = time.perf_counter()
            self.client.publish(self.topology.exchange, self.key, envelope, body)
            phases["encode"] += b - a
            phases["publish"] += time.perf_counter() - b
            del body
        t1 = time.perf_counter()

        def on_delivery(delivery) -> None:
            a = time.perf_counter()
            message = from_wire(delivery.envelope, delivery.body)
            b = time.perf_counter()
            self.server.ack(delivery)
            phases["decode"] += b - a
            phases["ack"] += time.perf_counter() - b
            got[message.message_id] = message

        tag = self.server.consume(self.topology.server_queue, on_delivery, prefetch=PREFETCH)
        while len(got) < len(self.updates):
            self.server.poll(1.0)
            if time.perf_counter() - t1 > ROUND_TIMEOUT:
                raise TimeoutError(
                    f"{self.name}: {len(got)} of {len(self.updates)} updates arrived in {ROUND_TIMEOUT:g} s"
                )
        t2 = time.perf_counter()
        self.server.cancel(tag)
        assert set(got) == {u.message_id for u in self.updates}
        first = got[self.updates[0].message_id].parameters["layer0.weight"]
        assert np.array_equal(first[:1000], self.updates[0].parameters["layer0.weight"][:1000])
        phases["consume"] = (t2 - t1) - phases["decode"] - phases["ack"]
        phases.update({"publish.split": _PHASES["split"], "consume.reassemble": _PHASES["reassemble"]})
        phases["total"] = t2 - t0
        return dict(phases)

    def close(self) -> None:
        self.client.close()
        self.server.close()
        with AmqpTransport(self.url, max_reconnect_s=10) as admin:
            self.topology.delete(admin)


class Raw:
    def __init__(self, url: str, bodies: list[bytes], stream: bool, tuned: bool = True) -> None:
        self.name = ("raw+stream" if stream else "raw") + ("" if tuned else "-4k")
        self.bodies = bodies
        self.nbytes = sum(len(b) for b in bodies)
        tag = uuid.uuid4().hex[:10]
        self.exchange = f"bench-transport-raw-{tag}"
        self.queue = f"bench-transport-raw-{tag}.server"
        self.stream = f"bench-transport-raw-{tag}.journal" if stream else None
        self.url = url
        self.pub_conn = pika.BlockingConnection(pika.URLParameters(url))
        self.con_conn = pika.BlockingConnection(pika.URLParameters(url))
        if tuned:
            _tune_reads(self.pub_conn)
            _tune_reads(self.con_conn)
        self.pub = self.pub_conn.channel()
        self.pub.confirm_delivery()
        admin = self.con_conn.channel()
        admin.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        admin.queue_declare(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
        admin.queue_bind(self.queue, self.exchange, "server.#")
        if self.stream:
            # the journal's own retention (RunTopology.journal_max_bytes): a smaller one makes the
            # broker truncate this stream during the run, work brokerfl's journal is spared
            admin.queue_declare(
                self.stream,
                durable=True,
                arguments={"x-queue-type": "stream", "x-max-length-bytes": RunTopology("x").journal_max_bytes},
            )
            admin.queue_bind(self.stream, self.exchange, "#")
        admin.close()
        self.chunks = sum(-(-len(b) // CHUNK) for b in bodies)

    def round(self) -> dict[str, float]:
        key = routing_key("server", ParameterUpdate.TYPE)
        t0 = time.perf_counter()
        for i, body in enumerate(self.bodies):
            view = memoryview(body)
            count = -(-len(body) // CHUNK)
            for index in range(count):
                part = body if count == 1 else bytes(view[index * CHUNK : (index + 1) * CHUNK])
                props = pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/msgpack",
                    message_id=f"{i}-{index}",
                    headers={"chunk": f"{index}/{count}"},
                )
                self.pub.basic_publish(self.exchange, key, part, props, mandatory=True)
        t1 = time.perf_counter()
        received: list[bytes] = []
        ch = self.con_conn.channel()
        ch.basic_qos(prefetch_count=PREFETCH)

        def on_message(channel, method, properties, body) -> None:
            received.append(body)
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume(self.queue, on_message)
        while len(received) < self.chunks:
            self.con_conn.process_data_events(time_limit=1.0)
            if time.perf_counter() - t1 > ROUND_TIMEOUT:
                raise TimeoutError(
                    f"{self.name}: {len(received)} of {self.chunks} messages arrived in {ROUND_TIMEOUT:g} s"
                )
        t2 = time.perf_counter()
        ch.close()
        assert sum(len(b) for b in received) == self.nbytes
        return {"publish": t1 - t0, "consume": t2 - t1, "total": t2 - t0}

    def close(self) -> None:
        for c in (self.pub_conn, self.con_conn):
            if c.is_open:
                try:
                    c.close()
                except Exception:
                    pass
        with pika.BlockingConnection(pika.URLParameters(self.url)) as conn:
            ch = conn.channel()
            for q in (self.queue, self.stream):
                if q:
                    ch.queue_delete(q)
            ch.exchange_delete(self.exchange)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--params", type=int, default=10_000_000, help="float32 parameters per update")
    parser.add_argument("--sizes", type=int, nargs="+", help="several --params values, e.g. 100000 10000000")
    parser.add_argument("--clients", type=int, default=4, help="updates per round")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per path (more for small sizes: up to 30)")
    parser.add_argument("--no-journal", action="store_true", help="skip the journal=True / raw+stream pair")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the brokerfl rounds and print the top functions"
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults (no brokerfl.transports.memory tuning)",
    )
    args = parser.parse_args()
    tuned = False if args.default_malloc else tune_allocator()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too

    sizes = args.sizes or [args.params]
    _instrument()
    rows = []
    totals: dict[tuple[int, str], list[float]] = {}
    for params in sizes:
        paths: list = []
        try:
            paths.append(Brokerfl(args.url, params, args.clients, journal=False))
            bodies = [to_wire(u)[1] for u in paths[0].updates]
            paths.append(Raw(args.url, bodies, stream=False))
            paths.append(Raw(args.url, bodies, stream=False, tuned=False))
            if not args.no_journal:
                paths.append(Brokerfl(args.url, params, args.clients, journal=True))
                paths.append(Raw(args.url, bodies, stream=True))
            del bodies
            results: dict[str, list[dict[str, float]]] = defaultdict(list)
            profiler = cProfile.Profile() if args.profile else None
            repeat = max(args.repeat, min(30, args.repeat * 10**6 // params))  # small rounds are noisy: more of them
            for rep in range(repeat + 1):  # the first round is a warm-up
                for path in (
                    paths[rep % len(paths) :] + paths[: rep % len(paths)]
                ):  # rotate: no path always follows the same one
                    gc.collect()
                    prof = profiler if (profiler and rep and path.name.startswith("brokerfl")) else None
                    if prof:
                        prof.enable()
                    cpu = time.process_time()
                    r = path.round()
                    r["cpu"] = (
                        time.process_time() - cpu
                    )  # this process's CPU (both connections): less at the mercy of load than seconds
                    if prof:
                        prof.disable()
                    if rep:
                        results[path.name].append(r)
                    print(
                        f"  {params:>11,} params  {path.name:17s} {'warm-up' if not rep else f'run {rep}':8s} "
                        f"{r['total']:7.3f} s",
                        file=sys.stderr,
                        flush=True,
                    )
            for path in paths:
                runs = results[path.name]
                median = statistics.median(r["total"] for r in runs)
                best = min(r["total"] for r in runs)
                phases = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "total"}
                rows.append((params, path.name, path.nbytes, median, best, phases))
                totals[(params, path.name)] = [r["total"] for r in runs]
            if profiler:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
                print(
                    f"\ncProfile of the brokerfl rounds ({params:,} params), by own time:\n"
                    + "\n".join(out.getvalue().splitlines()[4:])
                )
        finally:
            for path in paths:
                for attempt in range(5):  # the broker may be dropping connections (other tests)
                    try:
                        path.close()
                        break
                    except Exception as exc:  # keep cleaning up the others
                        print(
                            f"cleanup of {path.name} failed ({exc}); {'retrying' if attempt < 4 else 'giving up'}",
                            file=sys.stderr,
                        )
                        time.sleep(2)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{args.clients} updates per round, median (best) of {args.repeat} rounds (30 below 1M params) after a "
        "warm-up; MB = 10^6 bytes; "
        f"malloc {allocator_mode() if tuned else 'glibc defaults'}; load average now {load}"
    )
    print(
        f"{'params':>11} {'path':17s} {'MB':>7} {'s':>6} {'(best)':>6} {'MB/s':>5} {'vs raw':>6} {'paired':>6} "
        f"{'-enc':>5} {'vs 4k':>6}  where the time goes (median s)"
    )
    by = {(p, n): (nb, med, best, ph) for p, n, nb, med, best, ph in rows}
    for params, name, nbytes, median, best, phases in rows:
        baseline = "raw+stream" if name.endswith("journal") else "raw"
        raw = by.get((params, baseline))
        weak = by.get((params, "raw-4k")) if name == "brokerfl" else None
        ratio = " " * 19
        if raw and name.startswith("brokerfl"):
            # each brokerfl round against the baseline's round of the same repetition (they ran
            # seconds apart): less at the mercy of load that drifts over the run
            paired = statistics.median(b / a for a, b in zip(totals[(params, name)], totals[(params, baseline)]))
            ratio = f"{raw[1] / median:6.2f} {paired:6.2f} {raw[1] / (median - phases['encode']):5.2f}"
        ratio += f" {weak[1] / median:6.2f}" if weak else " " * 7
        where = "  ".join(f"{k} {v:.3f}" for k, v in phases.items())
        print(
            f"{params:>11,} {name:17s} {nbytes / 1e6:7.1f} {median:6.3f} {best:6.3f} {nbytes / 1e6 / median:5.0f} "
            f"{ratio}  {where}"
        )
    print(
        "vs raw = brokerfl MB/s / raw pika MB/s with the same socket reads (512 KiB) and durability (brokerfl+journal "
        "against"
    )
    print(
        f"raw+stream), goal >= {GOAL}; paired: median over repetitions of the same ratio, round by round; -enc: the "
        "same without brokerfl's encode (raw sends pre-encoded bytes); vs 4k: against raw"
    )
    print(
        "pika with its default 4 KiB socket reads; cpu: this process's CPU seconds per round (publisher and consumer; "
        "the broker's not included)"
    )


if __name__ == "__main__":
    main()
