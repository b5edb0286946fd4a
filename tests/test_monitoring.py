"""Monitoring: the Prometheus endpoint of servers and clients, the shipped alert rules
(promtool's unit tests), the Grafana dashboard (its structure, and every query naming a
series the processes export), localhost binding and the port-in-use error.

The federation test runs one server, one standby server and a client process over the real
RabbitMQ with ``--metrics-port``, scrapes each, and checks every series name in the
dashboard and the alert rules against what they serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brokerfl.cli.commands import build_parser
from brokerfl.ops.monitoring import MAX_CLIENTS_EXPORTED, MetricsServeError, ProcessMetrics

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "brokerfl.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
ALERTS = MONITORING / "alerts.yml"
RABBITMQ_NAMES = MONITORING / "rabbitmq_metrics.txt"

# PromQL words that look like names: aggregation modifiers, set operators, keywords.
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_WORDS |= {"offset", "bool", "inf", "nan", "atan2"}


def promtool() -> str | None:
    """The promtool binary, or None (the test is skipped; failed where CI requires it)."""
    found = shutil.which("promtool")
    if found is None and os.environ.get("BROKERFL_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool is required (BROKERFL_REQUIRE_PROMTOOL=1) and not on PATH")
    return found


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: neither functions, label names and
    values, durations, nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for found in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", expr):  # not a duration's unit
        after = expr[found.end() :].lstrip()
        if after.startswith("(") or found.group().lower() in PROMQL_WORDS:
            continue  # a function's name, or a keyword
        names.add(found.group())
    return names


def test_metric_names_are_parsed_out_of_promql():
    expr = (
        'histogram_quantile(0.9, sum by (le, run) (rate(a_bucket{run=~"$run", x="y(z)"}[$__rate_interval]))) '
        "/ on (job) group_left (run) b and ignoring(x) c_total offset 5m > bool 0.5 "
        'or label_replace(d, "run", "$1", "queue", "brokerfl\\\\.(.+)") unless time() - e'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c_total", "d", "e"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_of(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in panels_of(dashboard()) for target in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_the_dashboard_is_a_well_formed_grafana_dashboard():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    wanted = {"type": "prometheus", "uid": source["uid"]}
    panels = list(panels_of(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), ids
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert len(queried) >= 15
    for panel in queried:
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, panel
        assert panel["datasource"] == wanted, panel["title"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == wanted and target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"] == wanted
    # no two panels overlap
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine
    # what the brief of the dashboard promises, by the series it draws
    names = set().union(*map(metric_names, dashboard_expressions()))
    for needed in (
        "brokerfl_round",
        "brokerfl_rounds_planned",
        "brokerfl_model_version",
        "brokerfl_model_metric",
        "brokerfl_live_clients",
        "brokerfl_min_clients",
        "brokerfl_updates_dropped_total",
        "brokerfl_dead_lettered_total",
        "brokerfl_bytes_in_total",
        "brokerfl_bytes_out_total",
        "brokerfl_round_duration_seconds_bucket",
        "brokerfl_server_phase_seconds_sum",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "brokerfl_client_last_seen_timestamp_seconds",
    ):
        assert needed in names, needed


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus sees it once Grafana filled in its variables."""
    return expr.replace("${run:regex}", "run1").replace("$run", "run1").replace("$__rate_interval", "1m")


@pytest.mark.timeout(120)
def test_promtool_checks_and_unit_tests_the_alert_rules_and_parses_the_dashboard(tmp_path):
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(MONITORING / "alerts.test.yml")]):
        done = subprocess.run([tool, *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    # every alert has a firing and a quiet case in the unit tests
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            mine = [case for case in cases if case["alertname"] == rule["alert"]]
            assert any(case["exp_alerts"] for case in mine) and any(not case["exp_alerts"] for case in mine), rule
    # the dashboard's queries are PromQL: as recording rules, promtool parses them
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [tool, "check", "rules", str(tmp_path / "dashboard.rules.yml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_scrape_config_loads_the_rules_and_scrapes_rabbitmqs_detailed_families():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/detailed"
    assert set(jobs["rabbitmq"]["params"]["family"]) == {"queue_coarse_metrics", "queue_consumer_count"}
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    workers = [name for name, spec in services.items() if name != "rabbitmq" and "profiles" not in spec]
    assert {f"{name}:9100" for name in workers} == set(jobs["brokerfl"]["static_configs"][0]["targets"])
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / "docker" / source).exists(), mount


def test_metrics_listen_on_localhost_unless_told(monkeypatch):
    monkeypatch.delenv("BROKERFL_METRICS_ADDR", raising=False)
    for role in ("server", "client"):
        args = build_parser().parse_args([role, "--metrics-port", "9100"])
        assert args.metrics_addr == "127.0.0.1"
    monkeypatch.setenv("BROKERFL_METRICS_ADDR", "0.0.0.0")
    assert build_parser().parse_args(["server"]).metrics_addr == "0.0.0.0"
    metrics = ProcessMetrics("client", "r1", 0)  # port 0: any free one
    try:
        host, port = metrics.address
        assert host == "127.0.0.1" and port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        assert "process_resident_memory_bytes" in text
        with pytest.raises(MetricsServeError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: .*in use"):
            ProcessMetrics("client", "r1", port)
    finally:
        metrics.close()


@pytest.mark.timeout(240)
def test_a_port_in_use_is_one_clear_line_and_exit_code_2(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run: busy\nclients: 2\nrounds: 1\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        procs = {
            role: subprocess.Popen(
                [sys.executable, "-m", "brokerfl.cli", role, str(config), "--broker", "amqp://guest:guest@127.0.0.1:1/"]
                + (["--client-id", "0"] if role == "client" else [])
                + ["--metrics-port", str(port)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for role in ("server", "client")
        }
        for role, proc in procs.items():
            out, err = proc.communicate(timeout=200)
            assert proc.returncode == 2, (role, out, err)
            # besides its log's JSON lines (``starting``), one line says what is wrong
            said = [line for line in err.strip().splitlines() if not line.startswith("{")]
            assert said == [f"brokerfl {role}: cannot serve metrics on 127.0.0.1:{port}: Address already in use"], err
            assert "Traceback" not in err


# ---------------------------------------------------------------- a federation over RabbitMQ


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def exposed_names(text: str) -> set[str]:
    """The series names a scrape serves, families without samples included (a counter
    with no label values yet is still its names)."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def samples(text: str) -> list:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A server, a standby server and one client process (clients 0 and 1) of one run,
    each with its metrics port; rounds go on until the module's tests are done."""

    def __init__(self, url: str, out: Path) -> None:
        self.url, self.out = url, out
        self.run = "m" + uuid.uuid4().hex[:10]
        self.config = out / "run.yaml"
        self.config.write_text(
            f"run: {self.run}\nclients: 2\nrounds: 1000\n"
            "train: {epochs: 1, max_batches: 2}\n"
            "federated_evaluation: always\n"
            "strategy: {min_clients: 2, round_deadline_s: 60}\n"
        )
        self.ports = {"server": free_port(), "standby": free_port(), "client": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, role: str, *args: str) -> None:
        log = open(self.out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", role, str(self.config), "--broker", self.url]
            + ["--log-level", "warning", "--metrics-port", str(self.ports[name]), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("*.log")))

    def scrape_until(self, name: str, done, what: str, timeout: float = 240.0) -> str:
        """Scrape ``name`` every 0.1 s until ``done(text)``; returns that scrape."""
        deadline = time.monotonic() + timeout
        while True:
            for proc_name, proc in self.procs.items():
                assert proc.poll() is None, f"{proc_name} ended early\n{self.logs()}"
            try:
                text = scrape(self.ports[name])
                if done(text):
                    return text
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.logs()}"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)
        from brokerfl.transports.amqp import AmqpTransport
        from brokerfl.transports.topology import RunTopology

        with AmqpTransport(self.url) as cleaner:
            RunTopology(self.run).delete(cleaner, ["0", "1"])


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    return found[0] if found else None


@pytest.fixture(scope="module")
def federation(broker, tmp_path_factory) -> Iterator[dict[str, str]]:
    """Scrapes of the running federation: the server's with a round open and federated
    metrics, the standby's and the client process's."""
    fed = Federation(broker.url, tmp_path_factory.mktemp("monitoring"))
    try:
        fed.spawn("server", "server", "--out", str(fed.out))
        fed.scrape_until("server", lambda t: value(t, "brokerfl_server_active") == 1, "the server's role")
        fed.spawn("standby", "server", "--out", str(fed.out / "standby"))
        fed.spawn("client", "client", "--client-id", "0-1")
        server = fed.scrape_until(
            "server",
            lambda t: (
                value(t, "brokerfl_model_metric", source="federated", metric="accuracy") is not None
                and value(t, "brokerfl_round_open") == 1
                and (value(t, "brokerfl_round") or 0) >= 2
            ),
            "a round open after a federated evaluation",
        )
        standby = fed.scrape_until("standby", lambda t: value(t, "brokerfl_server_active") == 0, "the standby")
        client = fed.scrape_until(
            "client", lambda t: (value(t, "brokerfl_messages_handled_total") or 0) > 0, "a client"
        )
        yield {"run": fed.run, "server": server, "standby": standby, "client": client}
    finally:
        fed.stop()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_server_exports_the_run_round_metrics_and_clients(federation):
    run, text = federation["run"], federation["server"]
    brokerfl = [s for s in samples(text) if s.name.startswith("brokerfl_")]
    assert brokerfl and all(s.labels.get("run") == run for s in brokerfl)  # the run on every brokerfl series
    assert value(text, "process_resident_memory_bytes") > 1e6 and value(text, "process_cpu_seconds_total") > 0
    assert value(text, "brokerfl_server_active") == 1
    assert value(text, "brokerfl_rounds_planned") == 1000 and value(text, "brokerfl_round") >= 2
    assert value(text, "brokerfl_min_clients") == 2 and value(text, "brokerfl_live_clients") == 2
    left = value(text, "brokerfl_round_time_left_seconds")
    assert 0 < left <= 60
    assert abs(value(text, "brokerfl_round_deadline_timestamp_seconds") - (time.time() + left)) < 30
    for source in ("server", "federated"):
        assert 0 <= value(text, "brokerfl_model_metric", source=source, metric="accuracy") <= 1
        assert value(text, "brokerfl_model_metric", source=source, metric="loss") >= 0
        assert value(text, "brokerfl_model_metric_version", source=source) >= 1
    for client in ("0", "1"):
        states = {
            s.labels["state"]: s.value
            for s in samples(text)
            if s.name == "brokerfl_client_state" and s.labels["client"] == client
        }
        assert sum(states.values()) == 1 and (states["live"] or states["training"]), states
        seen = value(text, "brokerfl_client_last_seen_timestamp_seconds", client=client)
        assert abs(time.time() - seen) < 120
    assert value(text, "brokerfl_clients", state="live") + value(text, "brokerfl_clients", state="training") == 2
    assert f"the first {MAX_CLIENTS_EXPORTED} clients" in text  # the cap is in the help text
    assert value(text, "brokerfl_journal_max_bytes") == 4 * 1024**3
    assert value(text, "brokerfl_journal_bytes_estimate") > 0
    assert value(text, "brokerfl_rounds_total") >= 1  # versions stored; federated evaluations are no rounds


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_standby_and_client_processes_export_theirs(federation):
    run = federation["run"]
    standby, client = federation["standby"], federation["client"]
    assert value(standby, "brokerfl_server_active", run=run) == 0
    assert value(standby, "process_resident_memory_bytes") > 1e6
    assert value(client, "brokerfl_bytes_in_total", role="client", run=run) > 0
    assert value(client, "brokerfl_bytes_out_total", role="client", run=run) > 0
    assert value(client, "process_cpu_seconds_total") > 0


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_every_dashboard_and_alert_query_names_an_exported_series(federation):
    exported = set().union(*(exposed_names(federation[name]) for name in ("server", "standby", "client")))
    rabbitmq = {line.strip() for line in RABBITMQ_NAMES.read_text().splitlines() if line and not line.startswith("#")}
    for where, expressions in (("dashboard", dashboard_expressions()), ("alerts.yml", alert_expressions())):
        for expr in expressions:
            names = metric_names(expr)
            assert names, (where, expr)
            for name in names:
                known = rabbitmq if name.startswith("rabbitmq_") else exported
                assert name in known, f"{where}: {name} in {expr!r} is served by no process"
