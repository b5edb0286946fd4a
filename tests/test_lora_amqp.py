"""The LoRA example over RabbitMQ: a server process and two client processes, only the
adapter travelling, with DP-FedAvg and bfloat16 compression on; ``replay --check`` and
``accounting`` pass on its journal; a client whose base differs (another seed in its
config) leaves saying so, and the run goes on without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_processes import outputs_at_the_end, start_brokerfl

pytest.importorskip("peft")
pytest.importorskip("transformers")

from brokerfl.app import load_app  # noqa: E402
from brokerfl.cli import main  # noqa: E402
from brokerfl.config import load_config  # noqa: E402
from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

TINY = {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64, "samples": 32, "test_samples": 16}


def write_config(path: Path, run: str, **changes) -> Path:
    config = {
        "run": run,
        "seed": 3,
        "rounds": 2,
        "clients": 3,
        "app": "examples.lora_lm.app",
        "app_options": {**TINY, "lora": {"r": 2, "alpha": 4}, "domains": "own"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "max_batches": 2},
        # the server waits for all three (the other-base client too) however slowly a loaded machine starts them
        "strategy": {
            "name": "dp_fedavg",
            "min_clients": 2,
            "join_timeout_s": 300,
            "options": {"noise_multiplier": 0.01, "clip_norm": 1.0},
        },
        "compression": {"method": "bfloat16", "min_size": 1},
        "evaluate_every": 1,
        **changes,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_lora_run_over_rabbitmq_replays_and_accounts_and_refuses_another_base(amqp_url, run_name, tmp_path):
    config_path = write_config(tmp_path / "lora.yaml", run_name)
    other_base = write_config(tmp_path / "other-base.yaml", run_name, seed=4)  # model() builds another base
    out = tmp_path / "out"
    common = ["--broker", amqp_url, "--log-level", "info"]
    try:
        procs = [
            start_brokerfl("server", str(config_path), *common, "--out", str(out)),
            start_brokerfl("client", str(config_path), *common, "--client-id", "0-1"),
            start_brokerfl("client", str(other_base), *common, "--client-id", "2"),
        ]
        outputs = outputs_at_the_end(procs, timeout=480)
        assert [p.returncode for p in procs[:2]] == [0, 0], outputs
        server_log, _, other_log = outputs

        records = [r for r in read_metrics(out / "metrics.jsonl") if "evaluation" not in r]
        assert [r["num_updates"] for r in records] == [2, 2]  # client 2 trained nothing
        config = load_config(str(config_path))
        adapter = load_app(config).initial_parameters(config.seed)
        assert all(name.count("lora_") == 1 for name in adapter)  # only the adapter travels
        full = sum(p.numel() for p in load_app(config).adapter.module.state_dict().values())  # type: ignore[attr-defined]
        adapter_elements = sum(a.size for a in adapter.values())
        assert all(r["model_bytes"] == 4 * adapter_elements for r in records)
        assert adapter_elements < 0.1 * full
        assert all(r["update_bytes"] == 2 * 2 * adapter_elements for r in records)  # bfloat16: 2 bytes a value

        assert "differs from the server's" in other_log and "differs from the server's" in server_log, other_log
        assert main(["replay", str(config_path), *common, "--check"]) == 0
        assert main(["accounting", str(config_path), *common, "--out", str(out)]) == 0
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, ["0", "1", "2"])
