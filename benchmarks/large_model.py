"""A GPT-2-small-sized model (124.4M parameters) trained with full FedAvg over RabbitMQ: one
server process and 4 client processes, a few local SGD steps per round, 3 rounds, without
and with bfloat16 compression of the updates.

    python benchmarks/large_model.py [--methods none bfloat16] [--rounds 3] [--clients 4]
                                     [--steps 2] [--batch-size 2] [--seq-len 64] [--no-journal]

The app is ``benchmarks/large_model_app.py`` (``transformers.GPT2LMHeadModel(GPT2Config())``,
random init, synthetic token sequences). For each method it prints:

- **seconds per round**, each round: the server's ``duration_s`` of that version in
  ``metrics.jsonl``, the clients' training time, and the server's phases (round 1 starts
  once every client has joined, and includes the clients' first fetch of the model and
  their first, slower, training step);
- **bytes as sent**: what the broker acknowledged on each process's AMQP connections
  (``ss``'s tcp_info ``bytes_acked``, sampled every 0.5 s, per socket): the server's (model
  versions 0 to R to the models stream, version 0 once more in its journal record, the
  tasks) and the clients' (their updates, chunked, as compressed); per round: all of it
  over the rounds. The journal's copies of the rest are the broker's own, not sent. (Not
  cut per metrics line: the server writes a version's line only once its evaluation, run
  aside, is done, which may be after the next round's updates are in.)
- **peak RSS** of the server and of the largest client process (``ru_maxrss`` from
  ``os.wait4`` on each process), in multiples of the model's float32 bytes (its
  124,439,808 parameters x 4 bytes, which is what travels: the tied output layer once), and
  above the same processes' peak with
  a tiny model of the same code (the baseline run: torch, transformers, the runtime);
- the final perplexity on the server's test set, what the processes printed at log level
  warning, the load (``uptime``);

then checks that no queue or exchange of the run is left on the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

PARAMETERS = 124_439_808  # GPT2LMHeadModel(GPT2Config()): distinct parameters (lm_head is wte)
MODEL_BYTES = 4 * PARAMETERS
AMQP_PORT = 5672
OWNER = re.compile(rf":(\d+)\s+\S+:{AMQP_PORT}\s+users:\(\(\"[^\"]*\",pid=(\d+),")  # ss: local port, pid


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def bytes_sent(pids: dict[int, str], known: dict[tuple[int, int], int]) -> None:
    """Add to ``known`` ((pid, local port) -> bytes) what each process's AMQP connections
    have had acknowledged by the broker (``ss``'s tcp_info ``bytes_acked``: live, cheap).
    A connection since closed keeps its last count."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( dport = :{AMQP_PORT} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    key = None
    for line in out.splitlines():
        owner = OWNER.search(line)
        if owner:
            key = (int(owner[2]), int(owner[1])) if int(owner[2]) in pids else None
            continue
        acked = re.search(r"\bbytes_acked:(\d+)", line)
        if key is not None and acked:
            known[key] = int(acked[1])
            key = None


def leftovers(run: str, node: str | None) -> list[str]:
    """The run's queues and exchanges still on the broker."""
    found = []
    for what in ("list_queues", "list_exchanges"):
        command = ["rabbitmqctl", *(["-n", node] if node else []), "-q", what, "name"]
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
        found += [name for name in out.split() if f".{run}." in name or name.endswith(f".{run}")]
    return found


def run_federation(method: str, size: str, rounds: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One federation to its end: per-round seconds, bytes sent by each process, peak RSS,
    the metrics lines."""
    run = f"big-{size}-{method}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run,
        "seed": 0,
        "rounds": rounds,
        "clients": args.clients,
        "app": "large_model_app",
        "app_options": {"size": size, "seq_len": args.seq_len, "samples": 16, "test_samples": 2},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 0.05, "momentum": 0.0, "max_batches": args.steps},
        "strategy": {"name": "fedavg", "min_clients": args.clients, "round_deadline_s": 1800, "join_timeout_s": 600},
        "journal": not args.no_journal,
        "journal_max_bytes": 64 * 1024**3,  # keep the whole run: retention is not what is measured
        "max_message_mib": args.max_message_mib,  # the model is 475 MiB; the runtime's default bound is 256
        "compression": {"method": method},
        **({"liveness": {"timeout_s": args.liveness_timeout}} if args.liveness_timeout else {}),
    }
    path = workdir / f"{run}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    out = workdir / run
    out.mkdir()
    # the app is benchmarks/large_model_app.py (a package named benchmarks may be installed: not a dotted name)
    env = {**os.environ, "BROKERFL_AMQP_URL": args.broker, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    client_env = {**env, **({"BROKERFL_MALLOC": args.client_malloc} if args.client_malloc != "cli" else {})}
    common = [str(path), "--log-level", args.log_level]
    commands = {"server": ["server", *common, "--out", str(out)]}
    commands |= {f"client-{i}": ["client", *common, "--client-id", str(i)] for i in range(args.clients)}
    procs = {}
    for name, command in commands.items():
        with open(out / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "brokerfl.cli", *command],
                cwd=ROOT,
                env=env if name == "server" else client_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    names = {proc.pid: name for name, proc in procs.items()}
    peak_mib: dict[str, float] = {}
    sent: dict[tuple[int, int], int] = {}
    started = time.monotonic()
    try:
        while len(peak_mib) < len(procs):
            bytes_sent({pid: name for pid, name in names.items() if name not in peak_mib}, sent)
            for name, proc in procs.items():
                if name in peak_mib:
                    continue
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)  # collected here: Popen must not wait again
                    peak_mib[name] = usage.ru_maxrss / 1024
                    if proc.returncode != 0:
                        tail = (out / f"{name}.log").read_text()[-3000:]
                        raise SystemExit(f"{name} of run {run} exited with {proc.returncode}:\n{tail}")
            if (available := available_mib()) < args.min_available_mib:  # stop before the OOM killer picks
                raise SystemExit(f"run {run} stopped: {available:.0f} MiB of memory left on the machine")
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"run {run} did not finish within {args.timeout:.0f} s")
            time.sleep(0.5)  # polling the processes and their sockets
    finally:
        for name, proc in procs.items():
            if name not in peak_mib and proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        with AmqpTransport(args.broker) as admin:
            RunTopology(run, journal=not args.no_journal).delete(admin, [str(i) for i in range(args.clients)])
    by_process = {name: 0 for name in procs}
    for (pid, _), count in sent.items():
        by_process[names[pid]] += count
    return {
        "run": run,
        "records": read_metrics(out / "metrics.jsonl"),
        "sent": by_process,
        "peak_mib": peak_mib,
        "warnings": {name: warning_lines(out / f"{name}.log") for name in procs},
        "seconds": time.monotonic() - started,
        "left": leftovers(run, args.node),
    }


def available_mib() -> float:
    """The machine's MemAvailable."""
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) / 1024


def warning_lines(log: Path, limit: int = 5) -> list[str]:
    """The first lines of a process's output that are not info or debug records."""
    quiet = ('"level": "info"', '"level": "debug"')
    return [line[:300] for line in log.read_text().splitlines() if not any(q in line for q in quiet)][:limit]


def report(method: str, result: dict, baseline: dict | None, rounds: int) -> None:
    records, sent, peak = result["records"], result["sent"], result["peak_mib"]
    print(f"{method}: run {result['run']}, {len(records)} versions in {result['seconds']:.0f} s", flush=True)
    for r in records:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["server_s"].items()) if v >= 0.05)
        print(
            f"  round {r['round']}: {r['duration_s']:6.1f} s (clients' training {r['client_train_s']:.1f} s; server s: "
            f"{phases}); perplexity {r['metrics']['perplexity']:.0f}",
            flush=True,
        )
    server, clients = sent["server"], sum(v for k, v in sent.items() if k != "server")
    updates = rounds * (len(sent) - 1)
    print(
        f"  bytes sent: server {server / 1e6:.1f} MB (model versions 0-{rounds} to the models stream, version 0's "
        f"journal record, tasks), clients {clients / 1e6:.1f} MB ({updates} updates of {clients / updates / 1e6:.1f} "
        f"MB); per round {(server + clients) / rounds / 1e6:.1f} MB (all of it / {rounds})",
        flush=True,
    )
    model_mib = MODEL_BYTES / 1024**2
    for role, mib in (("server", peak["server"]), ("largest client", max(v for k, v in peak.items() if k != "server"))):
        base = ""
        if baseline is not None:
            floor = baseline["peak_mib"]["server" if role == "server" else "client-0"]
            base = f", {(mib - floor) / model_mib:.1f}x above the same process with the tiny model ({floor:.0f} MiB)"
        print(f"  peak RSS {role}: {mib:.0f} MiB = {mib / model_mib:.1f}x the model{base}", flush=True)
    noted = {name: lines for name, lines in result["warnings"].items() if lines}
    print(f"  process output (warnings, errors): {noted or 'none'}", flush=True)
    print(f"  left on the broker: {result['left'] or 'nothing'}; load: {uptime()}", flush=True)


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
    parser.add_argument("--no-baseline", action="store_true", help="skip the tiny model's run (the RSS floor)")
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument(
        "--max-message-mib", type=int, default=1024, help="max_message_mib (the runtime's default: 256)"
    )
    parser.add_argument(
        "--liveness-timeout", type=float, default=None, help="liveness.timeout_s (default: the runtime's, 10)"
    )
    parser.add_argument(
        "--client-malloc",
        default="lean",
        choices=["lean", "tuned", "default", "cli"],
        help="BROKERFL_MALLOC of the client processes (cli: unset, the command chooses: tuned for one client id)",
    )
    parser.add_argument("--log-level", default="warning", help="of the server and clients (their logs: --workdir)")
    parser.add_argument(
        "--min-available-mib", type=float, default=1024, help="stop a run when the machine has less memory left"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one federation may take")
    parser.add_argument(
        "--workdir", type=Path, help="keep each run's config, metrics and logs here (default: temporary)"
    )
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--node", default=os.environ.get("BROKERFL_RABBITMQ_NODE"), help="rabbitmqctl -n")
    args = parser.parse_args()
    print(
        f"large model: GPT-2 small, {PARAMETERS:,} parameters ({MODEL_BYTES / 1e6:.1f} MB float32, as it travels); "
        f"{args.clients} client processes, "
        f"{args.steps} SGD steps of {args.batch_size}x{args.seq_len} tokens per round, {args.rounds} rounds, journal "
        f"{'off' if args.no_journal else 'on'}",
        flush=True,
    )
    print(f"load before: {uptime()}; memory available {available_mib():.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="big-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        baseline = None
        if not args.no_baseline:
            baseline = run_federation("none", "tiny", 1, args, workdir)
            print(
                f"baseline, the tiny model (same processes, 1 round): peak RSS server "
                f"{baseline['peak_mib']['server']:.0f} MiB, client {baseline['peak_mib']['client-0']:.0f} MiB",
                flush=True,
            )
        for method in args.methods:
            report(method, run_federation(method, args.size, args.rounds, args, workdir), baseline, args.rounds)


if __name__ == "__main__":
    main()
