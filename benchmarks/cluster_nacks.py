"""How long a channel stays nacked after the node leading a quorum queue is killed -9, with
and without opening a new channel after a nack (RabbitMQ itself, raw pika: the evidence for
``AmqpTransport`` publishing again on a new channel after every nack).

    python benchmarks/cluster_nacks.py [--runs 4] [--watch 60] [--port 5901]

Each run starts three nodes (``bnackc1..3@localhost`` on ``--port`` .. ``--port``+2; needs
``rabbitmq-server`` and root), joins them, and declares through node 1 (so node 1 leads them
all, as the node a brokerfl server connects to first does) a topic exchange routing to a
quorum queue ``Q`` and a stream ``J`` (the journal). Two publishers connected to node 1
publish a small persistent confirmed message every 0.2 s; node 1 is killed -9; each then
reconnects to node 2 and goes on publishing: ``same channel`` keeps its channel after a
nack, ``new channel`` opens a new one after each nack. Printed per run and publisher: the
seconds from the kill until publishes were confirmed again (or "never" within ``--watch``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from rabbit_nodes import node_env  # noqa: E402


def _ctl(node: str, *args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-n", node, *args], capture_output=True, text=True, timeout=150).stdout


def _cluster(root: Path, port: int) -> list[tuple[str, int]]:
    nodes = [(f"bnackc{i}@localhost", port + i - 1) for i in (1, 2, 3)]
    for node, p in nodes:
        base = root / node.split("@")[0]
        base.mkdir()
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{p}\nloopback_users = none\n")
        (base / "enabled_plugins").write_text("[].\n")
        subprocess.run(["rabbitmq-server", "-detached"], env=node_env(node, p, base), check=True, capture_output=True)
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(root)], check=False)
    root.chmod(0o755)
    for node, _ in nodes:
        _ctl(node, "wait", "--timeout", "120", str(root / node.split("@")[0] / "pid"))
    for node, _ in nodes[1:]:
        _ctl(node, "stop_app")
        _ctl(node, "join_cluster", nodes[0][0])
        _ctl(node, "start_app")
    return nodes


class Publisher:
    def __init__(self, url: str, renew: bool) -> None:
        self.renew, self.url = renew, url
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.channel.confirm_delivery()
        self.confirmed_after_kill: float | None = None

    def publish(self, fallback_url: str) -> str:
        try:
            self.channel.basic_publish("X", "server.x", b"hello", pika.BasicProperties(delivery_mode=2), mandatory=True)
            return "ack"
        except pika.exceptions.NackError:
            if self.renew:
                self.channel.close()
                self.channel = self.conn.channel()
                self.channel.confirm_delivery()
            return "nack"
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosed):
            self.conn = pika.BlockingConnection(pika.URLParameters(fallback_url))
            self.channel = self.conn.channel()
            self.channel.confirm_delivery()
            return "reconnected"


def one_run(port: int, watch: float) -> dict[str, float | None]:
    root = Path(tempfile.mkdtemp(prefix="brokerfl-nacks-"))
    nodes: list[tuple[str, int]] = []
    try:
        nodes = _cluster(root, port)
        urls = [f"amqp://guest:guest@127.0.0.1:{p}/" for _, p in nodes]
        setup = pika.BlockingConnection(pika.URLParameters(urls[0]))
        ch = setup.channel()
        ch.exchange_declare("X", "topic", durable=True)
        ch.queue_declare("Q", durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_declare("J", durable=True, arguments={"x-queue-type": "stream"})
        ch.queue_bind("Q", "X", "server.#")
        ch.queue_bind("J", "X", "#")
        setup.close()
        publishers = {"same channel": Publisher(urls[0], renew=False), "new channel": Publisher(urls[0], renew=True)}
        for p in publishers.values():
            assert p.publish(urls[1]) == "ack"
        pid = int(_ctl(nodes[0][0], "eval", "os:getpid().").strip().strip('"'))
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while time.monotonic() - killed < watch:
            for p in publishers.values():
                outcome = p.publish(urls[1])
                if outcome == "ack" and p.confirmed_after_kill is None:
                    p.confirmed_after_kill = time.monotonic() - killed
                elif outcome != "ack":
                    p.confirmed_after_kill = None  # nacked again: not recovered yet
            time.sleep(0.2)
        return {name: p.confirmed_after_kill for name, p in publishers.items()}
    finally:
        for node, _ in nodes[1:]:
            _ctl(node, "stop")
        subprocess.run(["pkill", "-9", "-f", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--watch", type=float, default=60.0, help="seconds watched after the kill")
    parser.add_argument("--port", type=int, default=5901)
    args = parser.parse_args()
    print("load:", os.getloadavg())
    for run in range(1, args.runs + 1):
        result = one_run(args.port, args.watch)
        shown = ", ".join(f"{name}: {'never' if t is None else f'{t:.2f} s'}" for name, t in result.items())
        print(f"run {run}: publishes confirmed again after the kill -- {shown}", flush=True)


if __name__ == "__main__":
    main()
