"""Cyclic weight transfer and cross-site evaluation on digits: each in simulate and as
separate processes over RabbitMQ, with the same config.

    python benchmarks/workflows.py cyclic     [--broker URL]   # 5 clients; one holder kill -9'd mid-task
    python benchmarks/workflows.py cross-site [--broker URL]   # Dirichlet alpha 0.3, 5 clients

Cyclic over RabbitMQ: client 2 trains slowly (``client_slowdown``) so that it can be
killed while it holds the model; it is started again only after ``cyclic.hop_timeout_s``,
so the model has passed on to the next client and the returning client skips its expired
task. Prints final accuracies, accounting and replay results. Output under runs/bench-*.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def brokerfl(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_simulate(config: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "simulate",
            str(config),
            "--out",
            str(out),
            "--no-progress",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print(f"--- simulate ({time.perf_counter() - started:.0f} s)\n{proc.stdout}{proc.stderr[-2000:]}")


def metrics(out: Path) -> list[dict]:
    from brokerfl.storage.metrics_log import read_metrics

    return read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []


def check_run(config_path: Path, run: str, out: Path, url: str) -> None:
    for command in ("accounting", "replay"):
        extra = ["--out", str(out)] if command == "accounting" else ["--check"]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "brokerfl.cli",
                command,
                str(config_path),
                "--broker",
                url,
                "--run",
                run,
                *extra,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
        print(f"{command}: exit {proc.returncode}: {tail}")


def cleanup(url: str, run: str, clients: int) -> None:
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    with AmqpTransport(url) as admin:
        RunTopology(run).delete(admin, [str(i) for i in range(clients)])


def over_rabbitmq(
    config_path: Path, url: str, out: Path, *, kill: str | None = None, return_after_s: float = 0.0
) -> None:
    config = yaml.safe_load(config_path.read_text())
    run = f"bench-{config['run']}-{uuid.uuid4().hex[:6]}"
    clients = config["clients"]
    common = [str(config_path), "--broker", url, "--run", run, "--log-level", "warning"]
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    server = brokerfl("server", *common, "--out", str(out))
    procs = {str(i): brokerfl("client", *common, "--client-id", str(i)) for i in range(clients)}
    try:
        if kill is not None:
            # the version before the victim's hop is stored: the victim now holds the model
            while len(metrics(out)) < int(kill):
                time.sleep(0.2)
            time.sleep(1.0)
            procs[kill].kill()
            procs[kill].communicate()
            print(
                f"killed client {kill} (kill -9) while it held model version {len(metrics(out))}; restarting it in "
                f"{return_after_s:.0f} s"
            )
            time.sleep(return_after_s)
            procs[kill] = brokerfl("client", *common, "--client-id", kill)
        out_text, _ = server.communicate(timeout=1800)
    finally:
        for proc in procs.values():
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    records = metrics(out)
    print(
        f"--- over RabbitMQ ({time.perf_counter() - started:.0f} s), run {run}: exit {server.returncode}, "
        f"{len(records)} versions, "
        f"final accuracy {records[-1]['accuracy']:.4f}\n{out_text[-3000:]}"
    )
    check_run(config_path, run, out, url)
    cleanup(url, run, clients)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workflow", choices=["cyclic", "cross-site"])
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL"))
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    if args.workflow == "cyclic":
        config_path = ROOT / "configs" / "digits_cyclic.yaml"
        run_simulate(config_path, ROOT / "runs" / "bench-cyclic-sim")
        if args.broker:
            data = yaml.safe_load(config_path.read_text())
            data["client_slowdown"] = {"2": 40.0}  # so that it is caught holding the model
            data["cyclic"] = {**data.get("cyclic", {}), "order": "fixed", "hop_timeout_s": 15}
            killed = ROOT / "runs" / "bench-cyclic-kill.yaml"
            killed.parent.mkdir(exist_ok=True)
            killed.write_text(yaml.safe_dump(data))
            over_rabbitmq(killed, args.broker, ROOT / "runs" / "bench-cyclic-amqp", kill="2", return_after_s=20)
    else:
        config_path = ROOT / "configs" / "digits_cross_site.yaml"
        run_simulate(config_path, ROOT / "runs" / "bench-cross-site-sim")
        if args.broker:
            over_rabbitmq(config_path, args.broker, ROOT / "runs" / "bench-cross-site-amqp")
    print(f"load: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
