"""A GPT-2-small-sized model (124.4M parameters) trained with full FedAvg over RabbitMQ: one
server process and 4 client processes, a few local SGD steps per round, 3 rounds, without
and with bfloat16 compression of the updates.

    python benchmarks/large_model.py [--methods none bfloat16] [--rounds 3] [--clients 4]
                                     [--steps 2] [--batch-size 2] [--seq-len 64] [--no-journal]

The app is ``benchmarks/large_model_app.py`` (``transformers.GPT2LMHeadModel(GPT2Config())``,
random init, synthetic token sequences). For each method it prints:

- **seconds per round**, each round: the server's ``duration_s`` of that version in
  ``metrics.jsonl`` (round 1 includes the clients' start-up: importing torch and
  transformers, building the model, fetching version 0);
- **bytes per round, as sent**: the bytes the broker received on the run's own AMQP
  connections (``rabbitmqctl list_connections peer_port recv_oct``, the ports mapped to
  this run's processes with psutil) between one version's metrics line and the next: the
  model version the server publishes to the models stream, the tasks, the 4 updates as the
  clients send them (chunked), heartbeats; the journal's copy is the broker's and not in it;
- **peak RSS** of the server and of the largest client process (``ru_maxrss`` from
  ``os.wait4`` on each process), in MiB and in multiples of the model's float32 bytes (its
  124,439,808 distinct parameters x 4 bytes; the state_dict that travels holds the tied
  output layer a second time, 163,037,184 values);
- the load (``uptime``) before and after, and the final perplexity on the server's test set;

then checks that no queue or exchange of the run is left on the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

PARAMETERS = 124_439_808  # GPT2LMHeadModel(GPT2Config()): distinct parameters (lm_head is wte)
STATE_DICT_VALUES = 163_037_184  # its state_dict: lm_head.weight a second time
MODEL_BYTES = 4 * PARAMETERS
AMQP_PORT = 5672


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def broker_received(pids: list[int], node: str | None, known: dict[int, int]) -> int:
    """Bytes the broker has received on the AMQP connections of these processes. ``known``
    (peer port -> bytes) is updated and keeps the last count of a connection since closed
    (a process that exited), so a total never goes down."""
    ports = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue  # exited: its connections are gone from the broker's list too
        ports.update(c.laddr.port for c in connections if c.raddr and c.raddr.port == AMQP_PORT)
    command = ["rabbitmqctl", *(["-n", node] if node else []), "-q", "list_connections", "peer_port", "recv_oct"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    for line in out.splitlines():
        port, _, received = line.partition("\t")
        if port.strip().isdigit() and int(port) in ports and received.strip().isdigit():
            known[int(port)] = int(received)
    return sum(known.values())


def leftovers(run: str, node: str | None) -> list[str]:
    """The run's queues and exchanges still on the broker."""
    found = []
    for what in ("list_queues", "list_exchanges"):
        command = ["rabbitmqctl", *(["-n", node] if node else []), "-q", what, "name"]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
        found += [name for name in out.split() if f".{run}." in name or name.endswith(f".{run}")]
    return found


def run_federation(method: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One federation to its end: per-round seconds and bytes, peak RSS, final metrics."""
    run = f"big-{method}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run,
        "seed": 0,
        "rounds": args.rounds,
        "clients": args.clients,
        "app": "large_model_app",
        "app_options": {"size": args.size, "seq_len": args.seq_len, "samples": 16, "test_samples": 2},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 0.05, "momentum": 0.0, "max_batches": args.steps},
        "strategy": {"name": "fedavg", "min_clients": args.clients, "round_deadline_s": 1800, "join_timeout_s": 600},
        "journal": not args.no_journal,
        "journal_max_bytes": 64 * 1024**3,  # keep the whole run: retention is not what is measured
        "max_message_mib": 1024,  # the state_dict is 622 MiB; the default bound is 256 MiB
        "compression": {"method": method},
    }
    path = workdir / f"{run}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    out = workdir / run
    out.mkdir()
    env = {
        **os.environ,
        "BROKERFL_AMQP_URL": args.broker,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "benchmarks")]
        ),  # the app is benchmarks/large_model_app.py
    }
    common = [str(path), "--log-level", "warning"]
    commands = {"server": ["server", *common, "--out", str(out)]}
    commands |= {f"client-{i}": ["client", *common, "--client-id", str(i)] for i in range(args.clients)}
    procs = {}
    for name, command in commands.items():
        log = open(workdir / f"{run}-{name}.log", "w")  # noqa: SIM115 - closed when the process is collected
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
    peak_mib: dict[str, float] = {}
    received = [0]  # the broker's count at each version's metrics line; nothing before the processes start
    by_port: dict[int, int] = {}
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + args.timeout
    try:
        while len(peak_mib) < len(procs):
            for name, proc in procs.items():
                if name in peak_mib:
                    continue
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)  # collected here: Popen must not wait again
                    peak_mib[name] = usage.ru_maxrss / 1024
                    if proc.returncode != 0:
                        tail = (workdir / f"{run}-{name}.log").read_text()[-3000:]
                        raise SystemExit(f"{name} of run {run} exited with {proc.returncode}:\n{tail}")
            versions = len(read_metrics(metrics)) if metrics.exists() else 0
            if versions >= len(received) and "server" not in peak_mib:
                received.append(
                    broker_received([p.pid for n, p in procs.items() if n not in peak_mib], args.node, by_port)
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"run {run} did not finish within {args.timeout:.0f} s")
            time.sleep(0.2)  # polling the processes and the file the server appends to
    finally:
        for name, proc in procs.items():
            if name not in peak_mib and proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        with AmqpTransport(args.broker) as admin:
            RunTopology(run, journal=not args.no_journal).delete(admin, [str(i) for i in range(args.clients)])
    records = read_metrics(metrics)
    return {
        "run": run,
        "seconds": [r["duration_s"] for r in records],
        "train_seconds": [r["client_train_s"] for r in records],
        "bytes": [b - a for a, b in zip(received, received[1:])],
        "server_mib": peak_mib["server"],
        "client_mib": max(v for k, v in peak_mib.items() if k != "server"),
        "perplexity": [r["metrics"]["perplexity"] for r in records],
        "left": leftovers(run, args.node),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["none", "bfloat16"], choices=["none", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="client processes, one client each")
    parser.add_argument("--steps", type=int, default=2, help="local SGD steps per round")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--size", default="124M", choices=["124M", "tiny"], help="tiny: a check of the script only")
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one federation may take")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--node", default=os.environ.get("BROKERFL_RABBITMQ_NODE"), help="rabbitmqctl -n")
    args = parser.parse_args()
    model_mib = MODEL_BYTES / 1024**2
    print(
        f"large model: GPT-2 small, {PARAMETERS:,} parameters ({MODEL_BYTES / 1e6:.1f} MB float32), state_dict "
        f"{STATE_DICT_VALUES:,} values ({4 * STATE_DICT_VALUES / 1e6:.1f} MB); {args.clients} client processes, "
        f"{args.steps} SGD steps of {args.batch_size}x{args.seq_len} tokens per round, {args.rounds} rounds, journal "
        f"{'off' if args.no_journal else 'on'}",
        flush=True,
    )
    print(f"load before: {uptime()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="big-") as tmp:
        for method in args.methods:
            started = time.perf_counter()
            result = run_federation(method, args, Path(tmp))
            print(f"{method}: run {result['run']} done in {time.perf_counter() - started:.0f} s", flush=True)
            for i, (seconds, size) in enumerate(zip(result["seconds"], result["bytes"]), start=1):
                print(
                    f"  round {i}: {seconds:7.1f} s (clients' training {result['train_seconds'][i - 1]:.1f} s), "
                    f"{size / 1e6:8.1f} MB received by the broker, perplexity {result['perplexity'][i - 1]:.1f}",
                    flush=True,
                )
            server, client = result["server_mib"], result["client_mib"]
            print(
                f"  peak RSS: server {server:.0f} MiB = {server / model_mib:.1f}x the model, largest client "
                f"{client:.0f} MiB = {client / model_mib:.1f}x the model ({model_mib:.0f} MiB)",
                flush=True,
            )
            print(f"  left on the broker: {result['left'] or 'nothing'}; load: {uptime()}", flush=True)


if __name__ == "__main__":
    main()
