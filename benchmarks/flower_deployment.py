"""A Flower app under Flower's own deployment engine on loopback: one ``flower-superlink``,
N ``flower-supernode`` processes (node config ``partition-id``/``num-partitions``) and
``flwr run --stream``; the same app under brokerfl is :func:`run_brokerfl`.

    python benchmarks/flower_deployment.py [--app examples/flower/pytorch_app] [--nodes 4] [--rounds 5]
    python benchmarks/flower_deployment.py --engine brokerfl-simulate | brokerfl-processes

Prints the start-up (processes launched until every SuperNode is activated, and ``flwr
run`` until round 1 starts), the seconds of each round and their median from round 2 on,
the total, and the final metrics (the ServerApp's central evaluation if it has one, else
the aggregated ClientApp evaluation). Round times come from the arrival of the ServerApp's
``[ROUND k/N]`` log lines through ``flwr run --stream``; Flower ships those logs every
0.2 s and the stream polls every 0.5 s, so one round's figure is good to about a second;
the total is Flower's own "Strategy execution finished in" figure.

Everything runs in a temporary directory: ``FLWR_HOME`` (so the user's ``~/.flwr`` is not
touched; the SuperLink connection ``bench`` is written to its ``config.toml``) and the
ServerApp's working directory, where the app writes its final model. The SuperLink is told
not to install the app's dependencies (``uv sync``), so the run works offline in this
interpreter's environment; ``flwr run`` builds the FAB itself (no build backend needed).
Every process started here and every process below it is stopped at the end, also on
errors and Ctrl-C (Linux: the process tree is read from /proc).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_APP = ROOT / "examples" / "flower" / "pytorch_app"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
FINISHED = re.compile(r"Strategy execution finished in ([\d.]+)s")
METRICS = re.compile(r"MetricRecord: (\{.*\})")


@dataclass
class Proc:
    """A process started in a session of its own, its output (stamped on arrival) kept."""

    name: str
    popen: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start(name: str, argv: list[str], *, env: dict, cwd: Path, log_dir: Path, echo: bool = False) -> Proc:
    popen = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C at the terminal reaches this script alone, which stops it
    )
    proc = Proc(name, popen)

    def read() -> None:
        with (log_dir / f"{name}.log").open("w") as log:
            for line in popen.stdout:
                proc.lines.append((time.monotonic(), ANSI.sub("", line.rstrip("\n"))))
                log.write(line)
                if echo:
                    print(line, end="", flush=True)

    proc.reader = threading.Thread(target=read, name=f"read-{name}", daemon=True)
    proc.reader.start()
    return proc


def stop(procs: list[Proc]) -> None:
    """SIGTERM to every process started here and all their descendants, SIGKILL to what is
    left after 10 s. The descendants are looked up first: the SuperLink starts its SuperExec
    in a session of its own, so a process group does not hold them all."""
    pids = {proc.popen.pid for proc in procs if proc.popen.poll() is None}
    pids |= descendants(pids)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while (alive := {pid for pid in pids if _running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        _kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.popen.wait()


def descendants(roots: set[int]) -> set[int]:
    """Every process below `roots`, from the parent pids in /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has gone
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(proc: Proc, predicate, timeout: float, what: str) -> float:
    """Poll `proc`'s output until `predicate(lines)` holds; the monotonic time it held."""
    deadline = time.monotonic() + timeout
    while not predicate(proc.lines):
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s; see {proc.name}.log")
        time.sleep(0.05)
    return time.monotonic()


def run_flower(app: Path, *, nodes: int, rounds: int, timeout: float, echo: bool, keep: Path | None) -> dict:
    """One run of `app` under Flower's deployment engine; the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="flower-deployment-") as tmp:
        work = keep or Path(tmp)
        home, out = work / "flwr-home", work / "out"
        home.mkdir(parents=True, exist_ok=True)
        out.mkdir(exist_ok=True)
        link_port, *node_ports = free_ports(1 + nodes)
        link = f"127.0.0.1:{link_port}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "{link}"\ninsecure = true\n'
        )
        env = {
            **os.environ,
            "FLWR_HOME": str(home),
            # the SuperLink and SuperNodes start flower-superexec and the apps' processes by name
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # the apps import brokerfl (its datasets) from this checkout
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        procs: list[Proc] = []
        try:
            launched = time.monotonic()
            superlink = start(
                "superlink",
                [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)]
                + ["--disable-runtime-dependency-installation"],
                env=env,
                cwd=out,  # the ServerApp's working directory: its final model lands here
                log_dir=work,
            )
            procs.append(superlink)
            for i, port in enumerate(node_ports):
                argv = [str(BIN / "flower-supernode"), "--insecure", "--superlink", link, "--port", str(port)]
                argv += ["--node-config", f"partition-id={i} num-partitions={nodes}"]
                procs.append(start(f"supernode-{i}", argv, env=env, cwd=work, log_dir=work))
            ready = wait_for(
                superlink,
                lambda lines: sum("Activated node_id" in line for _, line in lines) >= nodes,
                120,
                f"activation of {nodes} SuperNodes",
            )

            overrides = run_config_overrides(app, rounds=rounds, nodes=nodes)
            submitted = time.monotonic()
            run = start(
                "flwr-run",
                [str(BIN / "flwr"), "run", str(app), "bench", "--stream", *overrides],
                env=env,
                cwd=work,
                log_dir=work,
                echo=echo,
            )
            procs.append(run)
            try:
                run.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s") from None
            run.reader.join(timeout=10)
            if run.popen.returncode != 0:
                tail = "\n".join(line for _, line in run.lines[-20:])
                raise RuntimeError(f"flwr run exited with {run.popen.returncode}:\n{tail}")
            figures = summarise(run.lines, launched=launched, ready=ready, submitted=submitted)
            final_model = out / "final_model.npz"
            if final_model.exists():
                with np.load(final_model) as arrays:
                    figures["final_model_parameters"] = int(sum(arrays[k].size for k in arrays.files))
            return figures
        finally:
            stop(procs)


def run_config_overrides(app: Path, *, rounds: int, nodes: int) -> list[str]:
    """`--run-config` for the keys the app has (flwr run refuses others): the rounds, and
    min-nodes (this repository's apps), so that round 1 waits for every node and each round
    trains all of them."""
    config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
    wanted = {"num-server-rounds": rounds, "min-nodes": nodes}
    pairs = " ".join(f"{key}={value}" for key, value in wanted.items() if key in config)
    return ["--run-config", pairs] if pairs else []


def final_metrics(lines) -> tuple[dict | None, dict | None]:
    """The last central (ServerApp-side) and aggregated ClientApp evaluation a ServerApp's
    log shows (Flower's strategies log both)."""
    server_metrics, client_metrics = None, None
    global_evaluation = False
    for line in lines:
        if "Global evaluation" in line:
            global_evaluation = True
        elif m := METRICS.search(line):
            record = ast.literal_eval(m.group(1))
            if global_evaluation:
                server_metrics, global_evaluation = record, False
            elif "Aggregated MetricRecord" in line:
                client_metrics = record
    return server_metrics, client_metrics


def summarise(lines: list[tuple[float, str]], *, launched: float, ready: float, submitted: float) -> dict:
    """Round starts, the finish and the last metrics, read from the ServerApp's log."""
    starts: dict[int, float] = {}
    finished_at, strategy_s = None, None
    for stamp, line in lines:
        if m := ROUND.search(line):
            starts.setdefault(int(m.group(1)), stamp)
        elif m := FINISHED.search(line):
            finished_at, strategy_s = stamp, float(m.group(1))
    server_metrics, client_metrics = final_metrics(line for _, line in lines)
    if not starts or finished_at is None:
        raise RuntimeError("the ServerApp's log has no [ROUND k/N] lines or no finish line")
    ends = [starts.get(k + 1, finished_at) for k in sorted(starts)]
    round_s = [end - starts[k] for k, end in zip(sorted(starts), ends)]
    steady = round_s[1:] or round_s
    return {
        "nodes_ready_s": round(ready - launched, 2),
        "run_to_round_1_s": round(starts[min(starts)] - submitted, 2),
        "round_s": [round(s, 2) for s in round_s],
        "median_round_s_from_round_2": round(statistics.median(steady), 2),
        "strategy_total_s": strategy_s,
        "wall_total_s": round(finished_at - launched, 2),
        "final_server_metrics": server_metrics,
        "final_client_metrics": client_metrics,
    }


# --- brokerfl side -------------------------------------------------------------------------


def run_brokerfl(app: Path, *, nodes: int, rounds: int, timeout: float, mode: str, broker: str) -> dict:
    """The same app under brokerfl: `brokerfl simulate` (mode "simulate") or one `brokerfl
    server` and `nodes` `brokerfl client` processes over RabbitMQ (mode "processes")."""
    sys.path.insert(0, str(ROOT))
    from brokerfl.config import RunConfig

    assert {"flower_app", "flower_config"} <= set(RunConfig.model_fields)
    from brokerfl.storage.metrics_log import read_metrics
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    run = f"flower-{os.getpid()}"
    config = {
        "run": run,
        "seed": 0,
        "clients": nodes,
        "flower_app": str(app),
        "flower_config": {"num-server-rounds": rounds, "min-nodes": nodes},
    }
    from brokerfl.flower.app_dir import load_flower_app

    known = load_flower_app(app).run_config  # an app without min-nodes (Flower's quickstarts) keeps its own
    config["flower_config"] = {k: v for k, v in config["flower_config"].items() if k in known}
    launched = time.time()
    with tempfile.TemporaryDirectory(prefix="flower-deployment-") as tmp:
        path, out = Path(tmp) / "config.yaml", Path(tmp) / "out"
        config["client_state_dir"] = str(Path(tmp) / "nodes")
        path.write_text(json.dumps(config))  # JSON is YAML
        cli = [sys.executable, "-m", "brokerfl.cli"]
        env = {**os.environ, "BROKERFL_AMQP_URL": broker, "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        if mode == "simulate":
            argvs = [[*cli, "simulate", str(path), "--out", str(out)]]
        else:
            argvs = [[*cli, "server", str(path), "--out", str(out)]]
            argvs += [[*cli, "client", str(path), "--client-id", str(i)] for i in range(nodes)]
        server_log = Path(tmp) / "server.log"  # the ServerApp's log (simulate's or the server process's)
        with server_log.open("w") as log:
            popens = [
                subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=env,
                    start_new_session=True,
                    stdout=log if i == 0 else subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
                for i, argv in enumerate(argvs)
            ]
        try:
            for popen in popens:
                if popen.wait(timeout=timeout) != 0:
                    raise RuntimeError(f"{popen.args[3]} exited with {popen.returncode}")
        finally:
            for popen in popens:
                if popen.poll() is None:
                    os.killpg(popen.pid, signal.SIGKILL)
                    popen.wait()
            if mode == "processes":
                with AmqpTransport(broker) as admin:
                    RunTopology(run).delete(admin, [str(i) for i in range(nodes)])
        wall = time.monotonic() - started
        records = read_metrics(out / "metrics.jsonl")
        server_metrics, client_metrics = final_metrics(ANSI.sub("", server_log.read_text()).splitlines())
    # a round ends with the ServerApp's last exchange of it; its time is from the previous round's end
    ends = {}
    for record in records:
        ends[record["round"]] = record["time"]
    times = [ends[r] for r in sorted(ends)]
    round_s = [b - a for a, b in zip(times, times[1:])]
    return {
        "startup_to_round_1_end_s": round(times[0] - launched, 2) if times else None,
        "round_s": [round(s, 3) for s in round_s],
        "median_round_s_from_round_2": round(statistics.median(round_s), 3) if round_s else None,
        "wall_total_s": round(wall, 2),
        "final_server_metrics": server_metrics,
        "final_client_metrics": client_metrics,
        "final_record": records[-1] if records else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=DEFAULT_APP, help="a Flower app directory (pyproject.toml)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--engine", default="flower", choices=["flower", "brokerfl-simulate", "brokerfl-processes"], help="who runs it"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds the run may take")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--echo", action="store_true", help="print the ServerApp's log as it streams")
    parser.add_argument("--keep", type=Path, help="keep the logs, FLWR_HOME and the out dir here")
    args = parser.parse_args()
    # a SIGTERM unwinds like Ctrl-C, through the finally that stops every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app = args.app.resolve()
    if args.engine == "flower":
        figures = run_flower(
            app, nodes=args.nodes, rounds=args.rounds, timeout=args.timeout, echo=args.echo, keep=args.keep
        )
    else:
        mode = args.engine.removeprefix("brokerfl-")
        figures = run_brokerfl(
            app, nodes=args.nodes, rounds=args.rounds, timeout=args.timeout, mode=mode, broker=args.broker
        )
    print(
        json.dumps(
            {"app": str(app), "engine": args.engine, "nodes": args.nodes, "rounds": args.rounds, **figures}, indent=1
        )
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process is stopped by then
        sys.exit(130)
