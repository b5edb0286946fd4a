"""Secure aggregation (SecAgg+) against plain FedAvg on the same config: bytes and seconds per
round at N clients, where a secure round's time goes, and (``--accuracy``) what it costs in
accuracy and how close its aggregate is to plain FedAvg's, against the quantisation bound.

    python benchmarks/secure_aggregation.py [--sizes 10 50 100] [--rounds 5]
                                            [--broker amqp://guest:guest@127.0.0.1:5672/]
                                            [--accuracy] [--accuracy-rounds 20] [--skip-cost]

The config is ``configs/digits_secure.yaml`` (digits, an MLP [128, 64], every client in
every round) and the same without its ``secure_aggregation`` section; for each row the plain
run and then the secure one, back to back, so both see the same load.

- Rows: N clients in ``brokerfl.assembly.simulate`` (in-process, one thread, journal on) for
  each of ``--sizes``; with ``--broker``, N = 10 over RabbitMQ as well: a server process and
  one process per client (``brokerfl server`` / ``brokerfl client --client-id i``), the run
  deleted from the broker afterwards (``brokerfl delete-run``).
- Bytes per client per round: from the run's journal, the message bodies of each round
  (envelopes and AMQP framing not counted), a broadcast counted once per receiving client;
  secure: TrainTask, SecureKeys, SecureKeyList, SecureShares, SecureSharesFor, SecureMasked,
  SecureUnmask, SecureReveal; plain: TrainTask, ParameterUpdate. The same every round; the
  mean over the rounds, divided by N.
- Seconds per round: the server's ``duration_s`` (metrics), median over rounds 2.. (round 1
  includes start-up).
- Where a secure round's time goes: from the journal's message timestamps (each set when the
  message is made), per round, the median over rounds 2..: training (the task to the last
  SecureKeys), each later stage (the last answer of the stage before to the last answer of
  this one: the server's forwarding and the clients' work), and the unmasking (the last
  SecureReveal to the server's SecureRound record); also metrics.jsonl's ``server_s["unmask"]``
  where the code times it (``protocol.unmask_sum`` alone), and in simulate timed directly
  (``protocol.unmask_sum``, or ``protocol.unmask`` in older code, plus ``quantise.decode_sum``).
- ``--accuracy``: digits, 10 clients, ``--accuracy-rounds`` rounds, secure and plain: final
  accuracy of each (the goal: within 0.5 points), and version 1 of each (same initial model,
  same client updates: training is deterministic per client and round) compared coordinate
  by coordinate. Two bounds: the weighted mean of the dequantised deltas, recomputed in
  float64 from the plain run's journaled updates, is within ``Quantisation.error_bound``
  (step / 2) of the exact weighted mean; each stored version is that mean added to the
  global model and rounded once to float32, so the two versions differ by at most step / 2
  plus half a float32 ulp of each (``np.spacing``), per coordinate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.assembly.roles import topology_for  # noqa: E402
from brokerfl.config import RunConfig, parse_config  # noqa: E402
from brokerfl.handlers.secure import protocol, quantise  # noqa: E402
from brokerfl.handlers.secure.run_settings import settings_for  # noqa: E402
from brokerfl.storage.journal import read_journal  # noqa: E402
from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.base import Delivery  # noqa: E402
from brokerfl.wire.message import ParameterUpdate, SecureRound, from_wire  # noqa: E402

CONFIG = ROOT / "configs" / "digits_secure.yaml"
GOAL_POINTS = 0.5

# the round's messages, by journal type; a broadcast reaches every client
SECURE_TYPES = (
    "train_task",
    "secure_keys",
    "secure_key_list",
    "secure_shares",
    "secure_shares_for",
    "secure_masked",
    "secure_unmask",
    "secure_reveal",
)
PLAIN_TYPES = ("train_task", "parameter_update")
BROADCAST_KEY = "clients."  # to_clients: one copy published, one delivered to each client's queue
# where a secure round's time goes: (phase, the type whose last message starts it, the one whose last ends it)
SECURE_PHASES = (
    ("training + keys", "train_task", "secure_keys"),
    ("stage 2: shares", "secure_keys", "secure_shares"),
    ("stage 3: masked vectors", "secure_shares", "secure_masked"),
    ("stage 4: reveal", "secure_masked", "secure_reveal"),
    ("unmasking (server)", "secure_reveal", "secure_round"),
)
PLAIN_PHASES = (("training", "train_task", "parameter_update"),)


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def raw_config(*, secure: bool, clients: int, rounds: int, run: str) -> dict[str, Any]:
    """``configs/digits_secure.yaml`` at ``clients`` and ``rounds``, journal on; plain:
    without its ``secure_aggregation`` section (nothing else differs)."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(run=run, clients=clients, rounds=rounds, journal=True)
    if not secure:
        raw.pop("secure_aggregation")
    return raw


def run_config(*, secure: bool, clients: int, rounds: int, run: str) -> RunConfig:
    return parse_config(raw_config(secure=secure, clients=clients, rounds=rounds, run=run))


# ---------------------------------------------------------------- reading a run's journal


@dataclass
class RoundTraffic:
    """One round's journaled messages: body bytes by type (a broadcast once per receiver)
    and the last timestamp of each type."""

    bytes_by_type: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    last: dict[str, float] = field(default_factory=dict)


def round_of(delivery: Delivery) -> int | None:
    """The round in a journaled message's headers (None: none, or not an integer)."""
    value = delivery.envelope.headers.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def round_traffic(deliveries: list[Delivery], types: tuple[str, ...], clients: int) -> dict[int, RoundTraffic]:
    rounds: dict[int, RoundTraffic] = defaultdict(RoundTraffic)
    for delivery in deliveries:
        envelope = delivery.envelope
        if (round_ := round_of(delivery)) is None:
            continue
        traffic = rounds[round_]
        traffic.last[envelope.type] = max(traffic.last.get(envelope.type, 0.0), envelope.timestamp)
        if envelope.type in types:
            receivers = clients if delivery.routing_key.startswith(BROADCAST_KEY) else 1
            traffic.bytes_by_type[envelope.type] += receivers * len(delivery.body)
    return rounds


@dataclass
class Row:
    where: str
    clients: int
    secure: bool
    bytes_per_client: float
    bytes_by_type: dict[str, float]  # per client per round
    round_s: float  # median over rounds 2..
    phases_s: dict[str, float]  # median over rounds 2..
    unmask_s: float | None = None  # timed in the process (simulate only)
    server_unmask_s: float | None = None  # metrics.jsonl's server_s["unmask"] (code that times it)
    whole_s: float = 0.0
    rounds: int = 0


def summarise(
    where: str,
    config: RunConfig,
    deliveries: list[Delivery],
    records: list[dict[str, Any]],
    *,
    whole_s: float,
    unmask_s: float | None = None,
) -> Row:
    secure = config.secure_aggregation is not None
    types = SECURE_TYPES if secure else PLAIN_TYPES
    n = config.clients
    traffic = round_traffic(deliveries, types, n)
    played = [r["round"] for r in records]
    if len(played) < 2:
        raise SystemExit("a row needs at least 2 rounds (round 1 is left out of the seconds)")
    for r in played:
        missing = [t for t in types if t not in traffic[r].bytes_by_type]
        if missing:
            raise SystemExit(f"{where}, N={n}: round {r} has no {missing} in the journal")
    by_type = {t: statistics.fmean(traffic[r].bytes_by_type[t] for r in played) / n for t in types}
    steady = played[1:]
    phases = {}
    for name, start, end in SECURE_PHASES if secure else PLAIN_PHASES:
        # training starts at the task (one message); a stage at the last answer of the one before
        phases[name] = statistics.median(traffic[r].last[end] - traffic[r].last[start] for r in steady)
    return Row(
        where=where,
        clients=n,
        secure=secure,
        bytes_per_client=sum(by_type.values()),
        bytes_by_type=by_type,
        round_s=statistics.median(r["duration_s"] for r in records[1:]),
        phases_s=phases,
        unmask_s=unmask_s,
        server_unmask_s=server_phase(records[1:], "unmask"),
        whole_s=whole_s,
        rounds=len(records),
    )


def server_phase(records: list[dict[str, Any]], phase: str) -> float | None:
    """The median over ``records`` of ``server_s[phase]`` (None: no record has it; a round
    without it counts 0, as metrics.jsonl leaves out phases of no time)."""
    seconds = [r.get("server_s", {}).get(phase) for r in records]
    if all(value is None for value in seconds):
        return None
    return statistics.median(float(value or 0.0) for value in seconds)


# ---------------------------------------------------------------- simulate


class UnmaskTimer:
    """Times the server's unmasking (``protocol.unmask_sum``, or ``protocol.unmask`` in code
    without it, and ``quantise.decode_sum``, looked up on their modules at each call) per round
    while installed. Only one of the two protocol functions is wrapped: ``unmask`` calls
    ``unmask_sum``, so wrapping both would count its time twice."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._name = "unmask_sum" if hasattr(protocol, "unmask_sum") else "unmask"
        self._originals = (getattr(protocol, self._name), quantise.decode_sum)

    def __enter__(self) -> UnmaskTimer:
        unmask, decode_sum = self._originals

        def timed_unmask(**kwargs):
            started = time.perf_counter()
            try:
                return unmask(**kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)

        def timed_decode_sum(*args, **kwargs):
            started = time.perf_counter()
            try:
                return decode_sum(*args, **kwargs)
            finally:
                if self.seconds:  # the server's decode follows its unmasking
                    self.seconds[-1] += time.perf_counter() - started

        setattr(protocol, self._name, timed_unmask)
        quantise.decode_sum = timed_decode_sum
        return self

    def __exit__(self, *exc) -> None:
        setattr(protocol, self._name, self._originals[0])
        quantise.decode_sum = self._originals[1]


def simulated(config: RunConfig):
    """(records, journal deliveries, store, seconds of the whole run, unmask seconds per round)."""
    from brokerfl.assembly.simulate import simulate
    from brokerfl.transports.local import LocalTransport

    started = time.perf_counter()
    with UnmaskTimer() as timer:
        result = simulate(config, journal=True)
    whole = time.perf_counter() - started
    deliveries = list(read_journal(LocalTransport(result.broker), topology_for(config, journal=True)))
    steady = timer.seconds[1:] or timer.seconds
    return result.records, deliveries, result.store, whole, (statistics.median(steady) if steady else None)


def simulate_row(*, secure: bool, clients: int, rounds: int) -> Row:
    kind = "secure" if secure else "plain"
    config = run_config(secure=secure, clients=clients, rounds=rounds, run=f"secbench-{kind}-{clients}")
    records, deliveries, _, whole, unmask_s = simulated(config)
    return summarise("simulate", config, deliveries, records, whole_s=whole, unmask_s=unmask_s if secure else None)


# ---------------------------------------------------------------- RabbitMQ


def broker_row(*, secure: bool, clients: int, rounds: int, url: str, workdir: Path) -> Row:
    """A server process and one process per client; the run's journal read off the broker,
    then the run deleted from it."""
    from brokerfl.transports.amqp import AmqpTransport

    kind = "secure" if secure else "plain"
    run = f"secbench-{kind}-{clients}-{uuid.uuid4().hex[:6]}"
    raw = raw_config(secure=secure, clients=clients, rounds=rounds, run=run)
    config = parse_config(raw)
    path = workdir / f"{run}.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = workdir / run
    out.mkdir()
    env = {**os.environ, "BROKERFL_AMQP_URL": url, "PYTHONPATH": str(ROOT)}
    common = [str(path), "--log-level", "warning"]
    logs = []

    def spawn(*args: str) -> subprocess.Popen:
        log = (out / f"{args[0]}-{len(logs)}.log").open("w")
        logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *args, *common], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    started = time.perf_counter()
    procs = [spawn("server", "--out", str(out))]
    procs += [spawn("client", "--client-id", str(i)) for i in range(clients)]
    try:
        deadline = time.monotonic() + 120 + 60 * rounds
        for proc in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                tail = (out / "server-0.log").read_text()[-2000:]
                raise SystemExit(f"a process of run {run} exited with {code}; server log ends:\n{tail}")
        whole = time.perf_counter() - started
        with AmqpTransport(url) as transport:
            deliveries = list(read_journal(transport, topology_for(config, journal=True)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
        subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", "delete-run", str(path), "--broker", url, "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    records = read_metrics(out / "metrics.jsonl")
    return summarise("RabbitMQ", config, deliveries, records, whole_s=whole)


# ---------------------------------------------------------------- printing


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_cost(pairs: list[tuple[Row, Row]], rounds: int) -> None:
    print(
        f"\ncost per round, secure (SecAgg+) against plain FedAvg, configs/digits_secure.yaml (digits, MLP [128, 64], "
        f"every client every round), {rounds} rounds, seconds: median of rounds 2-{rounds}\n"
    )
    print(
        "| where | N | k, t | KB per client per round: plain | secure | ratio | s per round: plain | secure | ratio "
        "| unmasking s per round |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for plain, secure in pairs:
        config = run_config(secure=True, clients=secure.clients, rounds=1, run="k-and-t")
        settings = settings_for(config)
        unmask = secure.phases_s["unmasking (server)"]
        unmask_text = f"{unmask:.3f}" + ("" if secure.unmask_s is None else f" (timed: {secure.unmask_s:.3f})")
        if secure.server_unmask_s is not None:
            unmask_text += f" (server_s: {secure.server_unmask_s:.3f})"
        print(
            f"| {secure.where} | {secure.clients} | {settings.neighbours}, {settings.threshold} "
            f"| {plain.bytes_per_client / 1e3:.1f} | {secure.bytes_per_client / 1e3:.1f} "
            f"| {ratio(secure.bytes_per_client, plain.bytes_per_client)} "
            f"| {plain.round_s:.3f} | {secure.round_s:.3f} | {ratio(secure.round_s, plain.round_s)} | {unmask_text} |"
        )
    print("\nsecure bytes per client per round, by message (KB; a broadcast once per receiver)\n")
    print("| where | N | " + " | ".join(SECURE_TYPES) + " |")
    print("|---|---|" + "---|" * len(SECURE_TYPES))
    for _, secure in pairs:
        cells = " | ".join(f"{secure.bytes_by_type[t] / 1e3:.2f}" for t in SECURE_TYPES)
        print(f"| {secure.where} | {secure.clients} | {cells} |")
    print("\nwhere a round's time goes (s, median of rounds 2..; from the journal's timestamps)\n")
    names = [name for name, _, _ in SECURE_PHASES]
    print("| where | N | plain: training | plain: s per round | " + " | ".join(names) + " | secure: s per round |")
    print("|---|---|---|---|" + "---|" * (len(names) + 1))
    for plain, secure in pairs:
        cells = " | ".join(f"{secure.phases_s[name]:.3f}" for name in names)
        print(
            f"| {secure.where} | {secure.clients} | {plain.phases_s['training']:.3f} | {plain.round_s:.3f} | {cells} "
            f"| {secure.round_s:.3f} |"
        )


# ---------------------------------------------------------------- accuracy and the bound


def accuracy(rounds: int) -> None:
    import torch

    torch.set_num_threads(1)  # as the CLI does
    runs = {}
    for secure in (False, True):
        kind = "secure" if secure else "plain"
        config = run_config(secure=secure, clients=10, rounds=rounds, run=f"secbench-accuracy-{kind}")
        records, deliveries, store, whole, _ = simulated(config)
        runs[kind] = (config, records, deliveries, store)
        print(f"  {kind}: {rounds} rounds in {whole:.0f} s; load {load()}", file=sys.stderr, flush=True)
    plain_acc = runs["plain"][1][-1]["accuracy"]
    secure_acc = runs["secure"][1][-1]["accuracy"]
    points = 100 * (secure_acc - plain_acc)
    verdict = "within" if abs(points) <= GOAL_POINTS else "NOT within"
    print(f"\naccuracy, digits, 10 clients, {rounds} rounds (simulate)\n")
    print(
        f"  plain FedAvg final accuracy {plain_acc:.4f}; secure {secure_acc:.4f} ({points:+.2f} points: {verdict} "
        f"the goal of {GOAL_POINTS} points)"
    )

    config, _, secure_deliveries, secure_store = runs["secure"]
    _, _, plain_deliveries, plain_store = runs["plain"]
    q = settings_for(config).quantisation
    v0_plain, v0_secure = plain_store.get(0), secure_store.get(0)
    if v0_plain.sha256 != v0_secure.sha256:
        raise SystemExit("the two runs start from different models")
    x0 = v0_plain.parameters
    plain_v1 = plain_store.get(1).parameters
    secure_v1 = secure_store.get(1).parameters

    # the weighted mean of the dequantised deltas against the exact one, in float64, from the
    # plain run's round-1 updates (the same the secure run's clients computed)
    updates = [
        message
        for d in plain_deliveries
        if d.envelope.type == ParameterUpdate.TYPE and round_of(d) == 1
        for message in [from_wire(d.envelope, d.body)]
    ]
    deltas = [
        ({name: np.asarray(u.parameters[name], np.float64) - np.asarray(x0[name], np.float64) for name in x0}, u)
        for u in updates
    ]
    weights = [int(u.num_samples) for u in updates]
    total_weight = sum(weights)
    exact = {name: sum(w * d[name] for (d, _), w in zip(deltas, weights, strict=True)) / total_weight for name in x0}
    words = [quantise.encode(d, w, q)[0] for (d, _), w in zip(deltas, weights, strict=True)]
    level_sum = np.zeros_like(words[0])
    for vector in words:
        level_sum += vector  # uint64: wraps mod 2^64, as the masked sum does
    dequantised, weight, clipped = quantise.decode_sum(level_sum, x0, q)
    if weight != total_weight:
        raise SystemExit(f"decoded weight {weight}, expected {total_weight}")
    errors = {n: dequantised[n] / weight - exact[n] for n in x0}
    quantisation_error, error_at = largest_at({n: np.abs(e) for n, e in errors.items()})
    # where no client moved a coordinate the mean must come back as exactly 0: with an even
    # number of steps 0 is a level (with an odd number it lay halfway and decoded as step / 2)
    unmoved = {n: np.all([d[n] == 0 for d, _ in deltas], axis=0) for n in x0}
    unmoved_count = sum(int(np.count_nonzero(m)) for m in unmoved.values())
    unmoved_errors = np.concatenate([errors[n][unmoved[n]] for n in x0])
    unmoved_text = (
        f"{unmoved_errors.min():+.3e} to {unmoved_errors.max():+.3e} (signed)" if unmoved_errors.size else "-"
    )
    moved_error = max(float(np.max(np.abs(errors[n][~unmoved[n]]), initial=0.0)) for n in x0)

    # the stored versions, float32; first: the secure version is the recomputed sum's (the
    # secure run's clients sent what the plain run's did), to a float32 ulp (summation order)
    recomputed_equal = recomputed_ulp = 0
    diff = bound = 0.0
    worst_ratio, over = 0.0, 0
    differences: dict[str, np.ndarray] = {}
    for name in x0:
        recomputed = (np.asarray(x0[name], np.float64) + dequantised[name] / weight).astype(secure_v1[name].dtype)
        recomputed_equal += int(np.count_nonzero(recomputed == secure_v1[name]))
        recomputed_ulp += int(np.count_nonzero(np.abs(recomputed - secure_v1[name]) <= np.spacing(np.abs(recomputed))))
        s = np.asarray(secure_v1[name], np.float64)
        p = np.asarray(plain_v1[name], np.float64)
        d = differences[name] = np.abs(s - p)
        ulps = np.spacing(np.abs(secure_v1[name])).astype(np.float64) + np.spacing(np.abs(plain_v1[name]))
        b = q.error_bound + 0.5 * ulps
        diff = max(diff, float(d.max()))
        bound = max(bound, float(b.max()))
        worst_ratio = max(worst_ratio, float(np.max(d / b)))
        over += int(np.count_nonzero(d > b))
    _, diff_at = largest_at(differences)
    record = next(
        message
        for d in secure_deliveries
        if d.envelope.type == SecureRound.TYPE and round_of(d) == 1
        for message in [from_wire(d.envelope, d.body)]
    )
    coordinates = sum(int(np.size(a)) for a in x0.values())
    print(
        f"\nversion 1, secure against plain: {coordinates:,} coordinates, {len(updates)} updates of total weight "
        f"{total_weight}, clip_range {q.clip_range}, bits {q.bits}; coordinates clipped: {record.clipped} in the "
        f"secure round, {clipped} recomputed"
    )
    print(
        f"the secure version 1 against x0 + the recomputed mean, rounded to float32: {recomputed_equal:,} coordinates "
        f"equal, {recomputed_ulp:,} within one ulp (of {coordinates:,})\n"
    )
    print("| quantity | largest per coordinate | bound |")
    print("|---|---|---|")
    print(
        f"| dequantised weighted mean of the deltas - exact (float64, recomputed) | {quantisation_error:.3e} "
        f"| {q.error_bound:.3e} (error_bound = step / 2) |"
    )
    print(f"|   where: {where(error_at)}, {quantisation_error / q.error_bound:.4f} of the bound | | |")
    print(
        f"| the same, coordinates some client moved | {moved_error:.3e} | {q.error_bound:.3e} |\n"
        f"| the same, the {unmoved_count} coordinates no client moved (every delta 0) | {unmoved_text} "
        f"| {q.error_bound:.3e} |"
    )
    print(
        f"| version 1 secure - plain (float32, as stored) | {diff:.3e} | {bound:.3e} (largest of error_bound + half "
        f"a float32 ulp of each, per coordinate) |"
    )
    name, index = diff_at
    print(
        f"|   where: {where(diff_at)}: secure {float(secure_v1[name][index]):.9g}, "
        f"plain {float(plain_v1[name][index]):.9g}, "
        f"quantisation error there {float(errors[name][index]):+.3e} | | |"
    )
    print(
        f"\n  float64 quantisation error - error_bound: {quantisation_error - q.error_bound:+.3e} (the float64 "
        f"arithmetic of decode_sum); per coordinate, |secure - plain| / its bound: largest {worst_ratio:.4f}; "
        f"coordinates over their bound: {over}"
    )


def largest_at(arrays: dict[str, np.ndarray]) -> tuple[float, tuple[str, tuple[int, ...]]]:
    """The largest value over the named arrays, and where: (name, index)."""
    name = max(arrays, key=lambda n: float(np.max(arrays[n])) if np.size(arrays[n]) else -np.inf)
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(arrays[name])), np.shape(arrays[name])))
    return float(arrays[name][index]), (name, index)


def where(at: tuple[str, tuple[int, ...]]) -> str:
    name, index = at
    return f"{name}[{', '.join(map(str, index))}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100], help="N clients of the simulate rows")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each cost row (round 1 left out of seconds)")
    parser.add_argument("--broker", help="AMQP URL: adds the N = 10 row over RabbitMQ")
    parser.add_argument("--broker-clients", type=int, default=10, help="N of the RabbitMQ row")
    parser.add_argument("--accuracy", action="store_true", help="also the accuracy and the quantisation bound")
    parser.add_argument("--accuracy-rounds", type=int, default=20)
    parser.add_argument("--skip-cost", action="store_true", help="only the accuracy (with --accuracy)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is left out of the seconds)")

    import torch

    from brokerfl.runtime.log import configure_logging

    configure_logging("error")
    torch.set_num_threads(1)  # as the client processes do
    print(f"secure aggregation benchmark; load {load()}", flush=True)
    if not args.skip_cost:
        pairs = []
        for n in args.sizes:
            plain = simulate_row(secure=False, clients=n, rounds=args.rounds)
            secure = simulate_row(secure=True, clients=n, rounds=args.rounds)
            pairs.append((plain, secure))
            print(
                f"  simulate N={n}: plain {plain.round_s:.3f} s, secure {secure.round_s:.3f} s per round (whole runs "
                f"{plain.whole_s:.1f} s, {secure.whole_s:.1f} s); load {load()}",
                flush=True,
            )
        if args.broker:
            with tempfile.TemporaryDirectory() as tmp:
                n = args.broker_clients
                plain = broker_row(secure=False, clients=n, rounds=args.rounds, url=args.broker, workdir=Path(tmp))
                secure = broker_row(secure=True, clients=n, rounds=args.rounds, url=args.broker, workdir=Path(tmp))
                pairs.append((plain, secure))
                print(
                    f"  RabbitMQ N={n}: plain {plain.round_s:.3f} s, secure {secure.round_s:.3f} s per round (whole "
                    f"runs {plain.whole_s:.1f} s, {secure.whole_s:.1f} s); load {load()}",
                    flush=True,
                )
        print_cost(pairs, args.rounds)
    if args.accuracy:
        accuracy(args.accuracy_rounds)
    print(f"\nload {load()}")


if __name__ == "__main__":
    main()
