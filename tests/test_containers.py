"""docker/compose.yaml for real: the image is built (on the offline base docker/build-base.sh
makes), the federation runs as containers with its own RabbitMQ container, and it trains
exactly like `brokerfl simulate`; a client and the server killed mid-run are brought back by
the restart policy and the accounting holds.

The commands that build, start, read and stop it are the containers tutorial's
(docs/tutorials/code/containers.sh, shown by docs/tutorials/containers.md), run section by
section with this test's image tag, compose project, ports and results directory.

Needs root or a running Docker engine (see container_engine.py); skipped with the reason
otherwise. Takes minutes (the image build downloads the dependencies): `-m "not container"`
leaves it out. Set BROKERFL_KEEP_IMAGE=1 to keep the built image between runs. The last
image built stays as a build cache (``brokerfl-test:cache``, beside the base images): the
next build reinstalls torch and the dependencies only when their layers' inputs changed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from container_engine import DockerEngine, EngineUnavailable, run
from tutorial_scripts import CODE, run_bash, section

from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.metrics_log import read_metrics

pytestmark = [pytest.mark.container, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
CONFIG = "configs/digits_fedavg.yaml"
BASE_IMAGE = "brokerfl-base:bookworm"  # kept as a cache, like the broker image below
BROKER_IMAGE = "brokerfl-rabbitmq:bookworm"
CACHE_IMAGE = "brokerfl-test:cache"  # the last build's layers, for the next build to reuse
BROKER_PORT = "5799"  # far from the machine's RabbitMQ nodes (5672, 5681-5686, TLS)
MANAGEMENT_PORT = "15799"
CLIENTS = 4
TUTORIAL = CODE / "containers.sh"


def tutorial(name: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Section ``name`` of the containers tutorial's commands, run from the repository root."""
    return run_bash(section(TUTORIAL, name), cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = DockerEngine(tmp_path_factory.mktemp("dockerd"))
    try:
        engine.ensure()
    except EngineUnavailable as exc:
        pytest.skip(f"no container engine can run here: {exc}")
    yield engine
    engine.close()


def _torch_wheels() -> list[str]:
    """The local torch 2.13.0 CPU wheel, from pip's find-links (this machine: /opt/wheels)."""
    found = run("pip", "config", "list", check=False).stdout if shutil.which("pip") else ""
    dirs = [
        part.strip("'\"")
        for line in found.splitlines()
        if "find-links" in line
        for part in line.split("=", 1)[1].split()
    ]
    return sorted({w for d in [*dirs, "/opt/wheels"] for w in glob.glob(os.path.join(d, "torch-2.13.0*.whl"))})


@pytest.fixture(scope="module")
def image(engine):
    """The worker image built from docker/Dockerfile on the offline base; removed after."""
    built = tutorial("base", {**os.environ, "BROKERFL_BROKER_IMAGE": BROKER_IMAGE}, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = ROOT / "docker" / "wheels"
    copied = []
    for wheel in _torch_wheels()[:1]:
        target = wheels / Path(wheel).name
        if not target.exists():
            shutil.copy(wheel, target)
            copied.append(target)
    keep = os.environ.get("BROKERFL_KEEP_IMAGE") == "1"
    tag = "brokerfl-test:latest" if keep else f"brokerfl-test:{uuid.uuid4().hex[:8]}"
    try:
        assert f"--build-arg BASE={BASE_IMAGE}" in section(TUTORIAL, "build")
        built = tutorial("build", {**os.environ, "BROKERFL_IMAGE": tag, "DOCKER_BUILDKIT": "0"}, timeout=1500)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    finally:
        for path in copied:
            path.unlink()
    _keep_as_cache(tag)
    yield tag
    if not keep:
        run("docker", "rmi", tag, check=False)  # only untags it: CACHE_IMAGE holds the layers


def _image_id(name: str) -> str | None:
    found = run("docker", "image", "inspect", "--format", "{{.Id}}", name, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


def _keep_as_cache(tag: str) -> None:
    """``tag``'s layers become the cache; the previous cache image goes (its layers the new
    one shares stay), so one image at most is kept, whatever the number of runs."""
    previous = _image_id(CACHE_IMAGE)
    run("docker", "tag", tag, CACHE_IMAGE)
    if previous is not None and previous != _image_id(CACHE_IMAGE):
        run("docker", "rmi", previous, check=False)


class ComposeRun:
    """One compose project (its own containers, network and broker) on docker/compose.yaml."""

    def __init__(self, engine: DockerEngine, image: str, runs: Path, **settings: str) -> None:
        self.project = f"bf{uuid.uuid4().hex[:8]}"
        self.runs = runs
        runs.mkdir(parents=True, exist_ok=True)
        runs.chmod(0o777)  # the workers run as an unprivileged user
        path = os.environ.get("PATH", "")
        if engine.compose_command() == ["docker", "compose"]:  # the tutorial says docker-compose
            shim = runs.parent / f"{runs.name}-bin"
            shim.mkdir(exist_ok=True)
            (shim / "docker-compose").write_text('#!/bin/sh\nexec docker compose "$@"\n')
            (shim / "docker-compose").chmod(0o755)
            path = f"{shim}{os.pathsep}{path}"
        self.env = {
            **os.environ,
            "PATH": path,
            "COMPOSE_PROJECT_NAME": self.project,  # the tutorial's commands name no project
            "BROKERFL_IMAGE": image,
            "BROKERFL_BROKER_IMAGE": BROKER_IMAGE,
            "BROKERFL_BROKER_PORT": BROKER_PORT,
            "BROKERFL_MANAGEMENT_PORT": MANAGEMENT_PORT,
            "BROKERFL_RUNS": str(runs),
            "BROKERFL_CLIENTS": str(CLIENTS),
            **settings,
        }
        self.command = [*engine.compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE)]
        self.services = [  # the workers: not the broker, nor the monitoring profile's services
            name
            for name, spec in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items()
            if name != "rabbitmq" and "profiles" not in spec
        ]

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        done = run(*self.command, *args, env=self.env, timeout=timeout, check=False)
        assert not check or done.returncode == 0, f"{' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def tutorial(self, name: str, timeout: float = 300) -> str:
        """The tutorial's section ``name`` for this project; its output (it must succeed)."""
        done = tutorial(name, self.env, timeout=timeout)
        assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout + done.stderr

    def up(self) -> None:
        self.tutorial("up")

    def down(self) -> None:
        tutorial("down", self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def state(self, service: str) -> dict:
        return json.loads(run("docker", "inspect", "-f", "{{json .State}}", self.container(service)).stdout)

    def restarts(self, service: str) -> int:
        return int(run("docker", "inspect", "-f", "{{.RestartCount}}", self.container(service)).stdout)

    def metrics(self) -> list[dict]:
        path = self.runs / self.env["BROKERFL_RUN"] / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "15", check=False).stdout[-6000:]

    def wait(self, condition, what: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.25)  # polling the engine and the metrics file under a deadline
        return value

    def crash(self, service: str) -> None:
        """SIGKILL the container's init from outside, as a crash or the OOM killer would.
        (`docker kill` counts as a deliberate stop, which no restart policy undoes.)"""
        os.kill(self.state(service)["Pid"], signal.SIGKILL)

    def finished(self) -> dict[str, int]:
        """Every worker's exit code once all have exited for good, else {}."""
        states = {service: self.state(service) for service in self.services}
        if any(s["Running"] or s["Restarting"] for s in states.values()):
            return {}
        return {service: s["ExitCode"] for service, s in states.items()}


@pytest.fixture
def compose_run(engine, image, tmp_path):
    made: list[ComposeRun] = []

    def make(**settings: str) -> ComposeRun:
        made.append(ComposeRun(engine, image, tmp_path / f"runs{len(made)}", **settings))
        return made[-1]

    yield make
    for project in made:
        project.down()


def local_records(run: str, rounds: int, config: str = CONFIG) -> list[dict]:
    torch.set_num_threads(1)  # as the workers do
    return simulate(load_config(config, {"run": run, "clients": CLIENTS, "rounds": rounds})).records


def image_torch(image: str) -> str:
    return run("docker", "run", "--rm", image, "python", "-c", "import torch; print(torch.__version__)").stdout.strip()


def test_the_compose_federation_trains_like_simulate(compose_run, image):
    rounds = 3
    fed = compose_run(BROKERFL_RUN="compose-digits", BROKERFL_ROUNDS=str(rounds))
    fed.up()
    listed = fed.tutorial("ps")
    assert all(service in listed for service in fed.services), listed
    codes = fed.wait(fed.finished, "every worker to exit")
    assert codes == dict.fromkeys(fed.services, 0), fed.logs()
    shown = fed.tutorial("logs")
    assert f"compose-digits: done at model version {rounds};" in shown, shown
    assert "curve.png\nfinal_model.npz\nmetrics.jsonl\nmodels\n" in shown, shown
    records = fed.metrics()
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == CLIENTS for r in records)
    assert (fed.runs / "compose-digits" / "curve.png").exists()

    local = local_records("compose-digits", rounds)
    assert [r["accuracy"] for r in records] == [r["accuracy"] for r in local]
    if image_torch(image) == torch.__version__:  # same torch: the same bits
        assert [r["sha256"] for r in records] == [r["sha256"] for r in local]


def test_a_client_and_the_server_crash_mid_run_and_come_back(compose_run, tmp_path):
    rounds = 8
    # Slow clients (a sleep after training) keep each round open for seconds, so the kills
    # land mid-round; the slowdown changes no number.
    config = (
        (ROOT / CONFIG).read_text() + "client_slowdown: {" + ", ".join(f'"{i}": 15' for i in range(CLIENTS)) + "}\n"
    )
    fed = compose_run(BROKERFL_RUN="compose-crash", BROKERFL_ROUNDS=str(rounds), BROKERFL_CONFIG="/runs/crash.yaml")
    (fed.runs / "crash.yaml").write_text(config)
    fed.up()

    fed.wait(lambda: len(fed.metrics()) >= 2, "version 2")
    fed.crash("client-1")
    fed.wait(lambda: fed.restarts("client-1") >= 1 and fed.state("client-1")["Running"], "client-1 to be restarted")
    fed.wait(lambda: len(fed.metrics()) >= 4, "version 4")
    fed.crash("server")
    fed.wait(lambda: fed.restarts("server") >= 1, "the server to be restarted")
    assert len(fed.metrics()) < rounds, "the run ended before the server was killed"

    codes = fed.wait(fed.finished, "every worker to exit")
    assert codes == dict.fromkeys(fed.services, 0), fed.logs()
    records = fed.metrics()
    assert [r["model_version"] for r in records] == list(range(1, rounds + 1))

    accounting = fed.tutorial("accounting", timeout=180)
    print(accounting)
    assert "OK: every update is accounted for exactly once" in accounting
    expected = local_records("compose-crash", rounds)[-1]["accuracy"]
    assert abs(records[-1]["accuracy"] - expected) <= 0.02, (records[-1]["accuracy"], expected)
