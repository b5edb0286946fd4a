"""``brokerfl dashboard`` in a real browser (Debian's headless Chromium, driven by Playwright)
over a real run on RabbitMQ: a server and a client process training slow-ish rounds, and
dashboards on it (read-only and admin) in this process. The run is long (400 rounds, so
it outlasts the tests at any load); the last test aborts it from the page.

- the page updates while the run trains (the version shown grows, the curve gains points);
- a hostile dead-letter reason and sender, and a hostile run-list reason, are shown as text:
  no script runs, no element is made of them;
- without ``--admin`` there are no admin buttons and the API refuses commands; a POST without
  the CSRF token is refused; with ``--admin`` the page sends a command and shows the reply.

Screenshots go to ``$BROKERFL_SHOTS`` when it is set (the docs' picture was made so).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.cli import main, operate
from brokerfl.config import load_config
from brokerfl.ops.dashboard import Dashboard, DashboardServer, accounting_on_broker, serve
from brokerfl.ops.runs import RunSummary
from brokerfl.runtime.operator_commands import StatusRequest, ask
from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.base import TransportError
from brokerfl.transports.topology import routing_key
from brokerfl.wire.message import Envelope

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
HOSTILE_TYPE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_SENDER = "</script><script>window.__pwned=2</script>"
HOSTILE_REASON = "<img src=x onerror=window.__pwned=3><script>window.__pwned=4</script>"
SHOTS = os.environ.get("BROKERFL_SHOTS")


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no Chromium (apt-get install chromium)"
    return None


def _require_browser() -> None:
    why = _browser_missing()
    if why:
        if os.environ.get("BROKERFL_REQUIRE_BROKER") == "1":  # CI: the browser is part of the run
            pytest.fail(why)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **({"X-CSRF-Token": token} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


# ---------------------------------------------------------------- without a broker


@pytest.mark.timeout(60)
def test_a_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["dashboard", "--broker", "amqp://127.0.0.1:1/", "--port", str(port)])
    assert code == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_headers_token_and_host_without_a_broker():
    """Security headers on every answer; POST without the token and a foreign Host refused;
    the run list's absence said."""

    def no_broker():
        raise TransportError("no broker here")

    dashboard = Dashboard(no_broker, [], gather=operate.gather, interval=0.2).start()
    server = serve(dashboard, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as response:
            page = response.read().decode()
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert server.token in page and "<script>" not in page.replace('<script src="/static/dashboard.js"', "")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/state", timeout=10) as response:
            assert response.headers["Content-Type"] == "application/json"
        assert post(server.port, "/api/admin", {"command": "pause"}, None)[0] == 403
        assert post(server.port, "/api/admin", {"command": "pause"}, "forged")[0] == 403
        status, answer = post(server.port, "/api/admin", {"command": "pause"}, server.token)
        assert status == 403 and "read-only" in answer["error"]
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/state", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        poll_until("the broker's absence said", lambda: dashboard.snapshot().get("broker") == "broker: no broker here")
    finally:
        server.shutdown()
        server.server_close()
        dashboard.stop()


@pytest.mark.timeout(60)
def test_the_dead_letter_queue_is_peeked_at_not_consumed():
    """A run without a journal: its dead letters come from the queue, taken and put back in
    order; one the broker dead-lettered itself says so."""
    from brokerfl.runtime.operator_commands import PauseRounds
    from brokerfl.transports.local import LocalBroker, LocalTransport
    from brokerfl.wire.message import to_wire

    config = load_config(None, {"run": "peek", "journal": False})
    dashboard = Dashboard(lambda: LocalTransport(), [config], gather=operate.gather)
    watch = dashboard._watch("peek")
    transport = LocalTransport(LocalBroker())
    watch.topology.declare(transport)
    envelope = Envelope(type=HOSTILE_TYPE, message_id="m1", sender=HOSTILE_SENDER, timestamp=time.time())
    transport.publish(watch.topology.exchange, routing_key("server", "hostile"), envelope, b"\xc1")
    transport.publish(watch.topology.exchange, routing_key("server", "pause_rounds"), *to_wire(PauseRounds()))
    first = transport.get(watch.topology.server_queue)
    transport.dead_letter(first, HOSTILE_REASON)  # as a worker does: the reason in a header
    transport.nack(transport.get(watch.topology.server_queue), requeue=False)  # as the broker does
    assert transport.queue_info(watch.topology.dead_queue).messages_ready == 2

    dashboard._peek_dead_letters(transport, watch, 2)
    rows = dashboard._run_snapshot(watch)["dead_letters"]
    assert [r["reason"] for r in rows] == [
        f"dead-lettered by the broker: rejected in queue {watch.topology.server_queue}",
        HOSTILE_REASON,
    ]
    assert rows[1]["kind"] == HOSTILE_TYPE and HOSTILE_SENDER in rows[1]["from"]
    assert transport.queue_info(watch.topology.dead_queue).messages_ready == 2  # still there, in order
    assert transport.get(watch.topology.dead_queue).envelope.message_id == "m1"


# ---------------------------------------------------------------- a real run, a real browser


class Federation:
    """One run (a server and a client process of two logical clients), two dashboards on it."""

    def __init__(self, url: str, out: Path) -> None:
        self.url, self.out = url, out
        self.run = "dash" + uuid.uuid4().hex[:8]
        self.config_path = out / "run.yaml"
        self.config_path.write_text(
            f"run: {self.run}\nclients: 2\nrounds: 400\napp: tests.dashboard_app\napp_options: {{train_s: 0.5}}\n"
            "strategy: {min_clients: 2, join_timeout_s: 1, round_deadline_s: 60}\n"
        )
        self.config = load_config(self.config_path)
        self.topology = topology_for(self.config)
        self.procs: list[subprocess.Popen] = []
        self.servers: list[tuple[DashboardServer, Dashboard]] = []
        self.transport = AmqpTransport(url)

    def spawn(self, *args: str) -> None:
        log = open(self.out / f"{len(self.procs):02d}-{args[0]}.log", "w")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "brokerfl.cli", args[0], str(self.config_path), "--broker", self.url, *args[1:]],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def dashboard(self, *, admin: bool) -> DashboardServer:
        hostile_other = RunSummary(run="other-run", state="crashed", reason=HOSTILE_REASON, round=3, rounds=5)

        def runs(_transport):  # the lead wires brokerfl.ops.runs.list_runs; its interface, faked
            return [RunSummary(run=self.run, state="training", round=1, rounds=40), hostile_other]

        dashboard = Dashboard(
            lambda: AmqpTransport(self.url),
            [self.config],
            gather=operate.gather,
            admin_message=operate.admin_message if admin else None,
            amqp_url=self.url,
            runs=runs,
            accounting=accounting_on_broker(lambda _config: AmqpTransport(self.url)),
        ).start()
        server = serve(dashboard, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append((server, dashboard))
        return server

    def wait_for_server(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ask(self.transport, self.topology, StatusRequest(), timeout=3) is not None:
                    return
            except TransportError:  # no server queue yet
                time.sleep(0.3)
        raise AssertionError(f"the server did not answer within {timeout} s:\n{self.logs()}")

    def publish_hostile(self) -> None:
        """A message whose type and sender are markup, and whose body does not decode: the
        server dead-letters it with a reason that quotes its type."""
        envelope = Envelope(
            type=HOSTILE_TYPE, message_id=uuid.uuid4().hex, sender=HOSTILE_SENDER, timestamp=time.time()
        )
        self.transport.publish(self.topology.exchange, routing_key("server", "hostile"), envelope, b"\xc1not msgpack")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("*.log")))

    def close(self) -> None:
        for _, dashboard in self.servers:
            dashboard.stop(wait=False)  # all at once: each may be waiting for a status answer
        for server, dashboard in self.servers:
            server.shutdown()
            server.server_close()
            dashboard.stop()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        try:
            self.topology.delete(self.transport, self.config.client_ids())
        finally:
            self.transport.close()


@pytest.fixture(scope="module")
def federation(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    _require_browser()
    fed = Federation(amqp_url, tmp_path_factory.mktemp("dashboard"))
    try:
        fed.spawn("server", "--log-level", "warning", "--out", str(fed.out / "out"))
        fed.wait_for_server()
        fed.publish_hostile()
        fed.spawn("client", "--log-level", "warning", "--client-id", "0-1")
        yield fed
    finally:
        fed.close()


@pytest.fixture(scope="module")
def browser(federation: Federation):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


def open_page(browser, server: DashboardServer):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"http://127.0.0.1:{server.port}/")
    return page, errors


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


def shown_version(page) -> int | None:
    text = page.text_content("#round-headline") or ""
    return int(text.rsplit("model version ", 1)[1]) if "model version " in text and text[-1].isdigit() else None


def curve_points(page) -> int:
    return (
        page.locator("#curves figure").first.locator("circle").count() if page.locator("#curves figure").count() else 0
    )


def poll_until(what: str, done, timeout: float = 120.0, logs=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = done()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
        time.sleep(0.25)


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_the_page_follows_a_training_run(federation: Federation, browser):
    server = federation.dashboard(admin=False)
    page, errors = open_page(browser, server)
    first = poll_until(
        "a model version and a curve of two points",
        lambda: (
            (v := shown_version(page)) is not None and v >= 1 and curve_points(page) >= 2 and (v, curve_points(page))
        ),
        timeout=240,
        logs=federation.logs,
    )
    later = poll_until(
        "a later version with more points",
        lambda: (v := shown_version(page)) is not None and v > first[0] and curve_points(page) > first[1] and v,
        logs=federation.logs,
    )
    assert later > first[0]
    shot(page, "dashboard-mid-run.png")
    assert "accuracy" in (page.text_content("#curves") or "")
    page.click("#accounting-button")
    poll_until("the accounting", lambda: "updates sent:" in (page.text_content("#accounting") or ""), timeout=60)
    clients = page.text_content("#clients") or ""
    assert "live" in clients and "0" in clients and "1" in clients
    # read-only: no admin buttons, the page says why
    assert page.is_hidden("#admin-actions") and page.is_visible("#admin-readonly")
    assert page.locator("button[data-command]:visible").count() == 0
    assert post(server.port, "/api/admin", {"command": "pause"}, None)[0] == 403
    assert post(server.port, "/api/admin", {"command": "pause"}, server.token)[0] == 403
    assert not errors, errors


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_hostile_text_is_shown_as_text(federation: Federation, browser):
    server = federation.dashboard(admin=False)
    page, errors = open_page(browser, server)
    poll_until(
        "the hostile dead letter on the page",
        lambda: HOSTILE_TYPE in (page.text_content("#dead") or ""),
        timeout=180,
        logs=federation.logs,
    )
    dead = page.text_content("#dead") or ""
    assert HOSTILE_SENDER in dead  # the claimed sender, as text
    runs = page.text_content("#runs") or ""
    assert HOSTILE_REASON in runs
    shot(page, "dashboard-hostile.png")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1  # the page's own
    # another run picked from the list: the page says why it has nothing to show; then back
    page.click("#runs button:has-text('other-run')")
    poll_until(
        "the other run",
        lambda: "no server of run other-run has started" in (page.text_content("#round-headline") or ""),
        timeout=60,
    )
    page.select_option("#run-select", federation.run)
    poll_until("the run again", lambda: shown_version(page) is not None, timeout=60)
    assert not errors, errors


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_an_admin_dashboard_sends_commands_with_its_token(federation: Federation, browser):
    server = federation.dashboard(admin=True)
    assert post(server.port, "/api/admin", {"command": "set-rounds", "values": ["500"]}, None)[0] == 403
    page, errors = open_page(browser, server)
    page.wait_for_selector("#admin-actions button[data-command=pause]", state="visible", timeout=60_000)
    assert page.is_hidden("#admin-readonly")
    page.fill("#admin-value", "500")
    page.click("button[data-command=set-rounds]")
    result = poll_until(
        "the server's reply on the page",
        lambda: (text := page.text_content("#admin-result") or "").startswith(("OK", "REFUSED")) and text,
        timeout=60,
        logs=federation.logs,
    )
    assert result.startswith("OK"), result
    poll_until("the admin log", lambda: "set_rounds" in (page.text_content("#admin-log") or ""), timeout=60)
    page.on("dialog", lambda dialog: dialog.accept("done <b>here</b>"))  # abort asks for a reason
    page.click("button[data-command=abort]")
    poll_until("the abort's reply", lambda: (page.text_content("#admin-result") or "").startswith("OK"), timeout=60)
    poll_until(
        "the run finished", lambda: (page.text_content("#run-state") or "") in ("finished", "no answer"), timeout=60
    )
    shot(page, "dashboard-admin.png")
    assert not errors, errors
