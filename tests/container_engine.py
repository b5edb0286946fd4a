"""A Docker engine for the container tests, left as it was found.

``DockerEngine.ensure()`` uses a running engine, or (as root) installs Debian's docker.io,
docker-compose and debootstrap with apt-get and starts ``dockerd`` itself; it raises
``EngineUnavailable`` with the reason when no engine can run here. ``close()`` undoes what
it did: stops the daemon it started, deletes the bridge it made, and puts back the
iptables rules and the IP forwarding setting as they were (the installed packages and the
engine's image store in /var/lib/docker stay).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ["docker.io", "docker-compose", "debootstrap"]
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class EngineUnavailable(Exception):
    """No container engine can run on this machine (the reason says why)."""


def run(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check, **kw)


def _engine_answers() -> bool:
    return shutil.which("docker") is not None and run("docker", "info", timeout=30, check=False).returncode == 0


class DockerEngine:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.daemon: subprocess.Popen | None = None
        self.saved_rules: dict[str, str] = {}
        self.saved_forward: str | None = None
        self.bridge_existed = True

    def ensure(self) -> None:
        if _engine_answers():
            self._check_tools()
            return
        if os.geteuid() != 0:
            raise EngineUnavailable("no running Docker engine, and not root to install and start one")
        self._install()
        self._start_daemon()
        self._check_tools()

    def _check_tools(self) -> None:
        missing = [tool for tool in ("debootstrap",) if shutil.which(tool) is None]
        if self.compose_command() is None:
            missing.append("docker-compose")
        if missing and os.geteuid() == 0:
            self._install()
            missing = [tool for tool in missing if tool != "docker-compose" and shutil.which(tool) is None]
            if self.compose_command() is None:
                missing.append("docker-compose")
        if missing:
            raise EngineUnavailable(f"missing {', '.join(missing)} (apt-get install {' '.join(PACKAGES)})")

    def _install(self) -> None:
        if shutil.which("apt-get") is None:
            raise EngineUnavailable("no Docker engine and no apt-get to install docker.io")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        if run(*install, timeout=900, check=False, env=env).returncode != 0:
            run("apt-get", "update", "-q", timeout=600, check=False, env=env)
            done = run(*install, timeout=900, check=False, env=env)
            if done.returncode != 0:
                raise EngineUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr[-500:]}")

    def _start_daemon(self) -> None:
        if shutil.which("dockerd") is None:
            raise EngineUnavailable("dockerd is not installed")
        for tool in ("iptables", "ip6tables"):
            if shutil.which(f"{tool}-save"):
                self.saved_rules[tool] = run(f"{tool}-save", check=False).stdout
        self.saved_forward = IP_FORWARD.read_text() if IP_FORWARD.exists() else None
        self.bridge_existed = Path("/sys/class/net/docker0").exists()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / "dockerd.log", "w")  # noqa: SIM115 - closed with the daemon
        self.daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                tail = (self.log_dir / "dockerd.log").read_text()[-800:]
                self.close()
                raise EngineUnavailable(f"dockerd does not start here: {tail}")
            time.sleep(0.2)  # polling the daemon's socket under a deadline

    def compose_command(self) -> list[str] | None:
        """Debian's docker-compose (v1.29), else the `docker compose` plugin."""
        if shutil.which("docker-compose"):
            return ["docker-compose"]
        if shutil.which("docker") and run("docker", "compose", "version", check=False, timeout=30).returncode == 0:
            return ["docker", "compose"]
        return None

    def close(self) -> None:
        """Stop the daemon this started and undo its network changes (nothing if it found
        an engine running)."""
        if self.daemon is None:
            return
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None
        if not self.bridge_existed and Path("/sys/class/net/docker0").exists():
            run("ip", "link", "delete", "docker0", check=False)
        for tool, saved in self.saved_rules.items():
            _restore_rules(tool, saved)
        if self.saved_forward is not None:
            IP_FORWARD.write_text(self.saved_forward)


def _tables(save_output: str) -> set[str]:
    return {line[1:].strip() for line in save_output.splitlines() if line.startswith("*")}


def _restore_rules(tool: str, saved: str) -> None:
    """Back to `saved`: tables that did not exist are emptied, the others restored."""
    now = run(f"{tool}-save", check=False).stdout
    for table in _tables(now) - _tables(saved):
        run(tool, "-t", table, "-F", check=False)
        run(tool, "-t", table, "-X", check=False)
        for chain in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"):
            run(tool, "-t", table, "-P", chain, "ACCEPT", check=False)
        if shutil.which("nft"):  # the nf_tables backend keeps the empty table: drop it
            run("nft", "delete", "table", "ip6" if tool == "ip6tables" else "ip", table, check=False)
    if saved.strip():
        run(f"{tool}-restore", input=saved, check=False)
