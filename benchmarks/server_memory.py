"""Server peak RSS against the number of clients, over RabbitMQ, journal on.

    python benchmarks/server_memory.py [--clients 4 16 48] [--rounds 2] [--processes 4]
        [--root DIR] [--png server_memory.png]

For each N: one ``brokerfl server`` process and ``--processes`` ``brokerfl client``
processes hosting N logical clients between them, FedAvg on the 10M-parameter MLP of
``benchmarks/round_time.py`` (38 MiB float32), one local batch per round. The server's
peak RSS is its ``ru_maxrss`` (``os.wait4`` on the server process alone). The baseline is
the same server process with a model of about 1,700 parameters ("without a model").
``--root`` runs another checkout's code (e.g. the base commit, for a before/after) with
this script. Prints the load (``uptime``) and plots RSS against N to ``--png``.

Goal: flat within 10% across N and at most 5x the model size above baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

HIDDEN_10M = 3130  # as benchmarks/round_time.py: [h, h] on digits
HIDDEN_NONE = 16


def parameter_count(h: int) -> int:
    return 64 * h + h + h * h + h + h * 10 + 10


def id_ranges(clients: int, processes: int) -> list[str]:
    """``--client-id`` of each client process: N ids split into contiguous ranges."""
    processes = min(processes, clients)
    bounds = [round(i * clients / processes) for i in range(processes + 1)]
    return [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def run(root: Path, url: str, hidden: int, clients: int, processes: int, rounds: int, workdir: Path) -> dict:
    """Run one federation to its end; the server's and the client processes' peak RSS (MiB)."""
    name = f"mem-{clients}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": name,
        "seed": 0,
        "rounds": rounds,
        "clients": clients,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"hidden": [hidden] * 2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "momentum": 0.0, "max_batches": 1},
        "strategy": {"name": "fedavg", "min_clients": clients, "round_deadline_s": 600, "join_timeout_s": 600},
        "journal": True,
        "journal_max_bytes": 64 * 1024**3,  # keep every message: retention is not what is measured
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "BROKERFL_AMQP_URL": url, "PYTHONPATH": str(root)}
    common = [str(path), "--log-level", "warning"]
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(workdir / name)], cwd=root, env=env
    )
    client_procs = [
        subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", ids], cwd=root, env=env
        )
        for ids in id_ranges(clients, processes)
    ]
    try:
        deadline = 120 + 120 * rounds * max(1, clients // 16)
        _, status, usage = _wait4(server.pid, deadline)
        server_rss = usage.ru_maxrss / 1024
        client_rss = []
        for proc in client_procs:
            _, cstatus, cusage = _wait4(proc.pid, 120)
            client_rss.append(cusage.ru_maxrss / 1024)
            if os.waitstatus_to_exitcode(cstatus) != 0:
                raise SystemExit(f"a client process of run {name} exited with {os.waitstatus_to_exitcode(cstatus)}")
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the server of run {name} exited with {os.waitstatus_to_exitcode(status)}")
    finally:
        for proc in [server, *client_procs]:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        with AmqpTransport(url) as admin:
            RunTopology(name, journal=True).delete(admin, [str(i) for i in range(clients)])
    return {
        "clients": clients,
        "server_mib": server_rss,
        "client_mib_max": max(client_rss),
        "seconds": time.perf_counter() - started,
    }


def _wait4(pid: int, timeout: float):
    """os.wait4 with a deadline (polling WNOHANG): (pid, status, rusage of that process alone)."""
    end = time.monotonic() + timeout
    while True:
        got_pid, status, usage = os.wait4(pid, os.WNOHANG)
        if got_pid == pid:
            return got_pid, status, usage
        if time.monotonic() > end:
            raise SystemExit(f"process {pid} did not finish within {timeout:.0f} s")
        time.sleep(0.2)


def plot_logs(logs: list[Path], png: Path, model_mib: float) -> None:
    """Server peak RSS against N of each output (its label from its lines), one line each."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for log in logs:
        text = log.read_text()
        label = (re.search(r"^\[(.+?)\]", text, re.M) or [None, log.stem])[1]
        base = float(re.search(r"baseline \(server without a model.*?peak RSS (\d+) MiB", text).group(1))
        points = [(int(n), float(mib)) for n, mib in re.findall(r"N=\s*(\d+): server peak RSS (\d+) MiB", text)]
        (line,) = ax.plot(*zip(*points), "o-", label=f"{label}: server peak RSS")
        ax.axhline(base, color=line.get_color(), linestyle=":", linewidth=1, label=f"{label}: baseline (no model)")
        ax.axhline(
            base + 5 * model_mib,
            color="red",
            linestyle="--",
            linewidth=1,
            label="baseline + 5x model (goal)" if log is logs[-1] else None,
        )
    ax.set_xlabel("logical clients N (in 4 client processes)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Server peak RSS, FedAvg, 10M parameters ({model_mib:.0f} MiB), journal on", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 48])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4, help="client processes the N logical clients share")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose brokerfl runs (default: this one)")
    parser.add_argument("--png", type=Path, help="plot server peak RSS against N to this file")
    parser.add_argument("--label", default="", help="a name for this code in the output (e.g. before, after)")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument(
        "--plot-logs",
        type=Path,
        nargs="+",
        help="plot earlier outputs of this script (e.g. before and after) to --png, and run nothing",
    )
    args = parser.parse_args()
    model_mib = parameter_count(HIDDEN_10M) * 4 / 1024**2
    if args.plot_logs:
        plot_logs(args.plot_logs, args.png or Path("server_memory.png"), model_mib)
        return
    label = f"[{args.label}] " if args.label else ""
    allocator = (
        os.environ.get("BROKERFL_MALLOC")
        or "BROKERFL_MALLOC unset (the code's CLI chooses; this code's: server lean, clients tuned)"
    )
    print(f"{label}code: {args.root}; allocator: {allocator}; load before: {uptime()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = run(args.root, args.broker, HIDDEN_NONE, 4, args.processes, args.rounds, Path(tmp))
        print(
            f"{label}baseline (server without a model, {parameter_count(HIDDEN_NONE):,} parameters, N=4): peak RSS "
            f"{base['server_mib']:.0f} MiB",
            flush=True,
        )
        results = []
        for n in args.clients:
            r = run(args.root, args.broker, HIDDEN_10M, n, args.processes, args.rounds, Path(tmp))
            above = r["server_mib"] - base["server_mib"]
            r["above_model_x"] = above / model_mib
            results.append(r)
            print(
                f"{label}N={n:>3}: server peak RSS {r['server_mib']:.0f} MiB = baseline + {above:.0f} MiB = baseline + "
                f"{r['above_model_x']:.1f}x model "
                f"({model_mib:.1f} MiB); largest client process {r['client_mib_max']:.0f} MiB; run {r['seconds']:.0f} "
                f"s; load {uptime().split('load average:')[-1].strip()}",
                flush=True,
            )
    peaks = [r["server_mib"] for r in results]
    spread = max(peaks) / min(peaks) - 1
    worst = max(r["above_model_x"] for r in results)
    print(
        f"{label}spread across N: {spread * 100:.1f}% (goal <= 10%: {'met' if spread <= 0.10 else 'NOT met'}); "
        f"worst above baseline: {worst:.1f}x model (goal <= 5x: {'met' if worst <= 5 else 'NOT met'})"
    )
    print(f"{label}load after: {uptime()}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [r["clients"] for r in results],
            peaks,
            "o-",
            label=f"server peak RSS{' (' + args.label + ')' if args.label else ''}",
        )
        ax.axhline(base["server_mib"], color="grey", linestyle=":", label="baseline (no model)")
        ax.axhline(base["server_mib"] + 5 * model_mib, color="red", linestyle="--", label="baseline + 5x model (goal)")
        ax.set_xlabel("logical clients N")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Server peak RSS, FedAvg, 10M-parameter model ({model_mib:.0f} MiB), journal on", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
