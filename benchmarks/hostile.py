"""A 20-round digits run (server + 4 logical clients over RabbitMQ) under 10,000 hostile
messages, beside the same run without them.

    python benchmarks/hostile.py [--rounds 20] [--clients 4] [--hostile 10000] [--broker URL]

Runs the clean run first (its duration sets how long the attack is spread over: 70% of
it), then the run under fire, and prints for each: server exit, accuracy, server peak RSS
(VmHWM), what ``brokerfl accounting`` and ``brokerfl replay --check`` said (exit and the
skipped journal records they report), and for the attack what became of the hostile
messages (dead letters, drop records, folded: must be 0, unanswered: must be none).
The message generator is :mod:`tests.tools.hostile`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tools.hostile import run_under_fire  # noqa: E402


def skipped_line(report: str) -> str:
    return next(
        (line for line in report.splitlines() if line.startswith("skipped journal records")), "(no skipped line)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hostile", type=int, default=10_000)
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for label, hostile in (("clean", 0), ("under fire", args.hostile)):
            spread = 0.7 * results["clean"].seconds if results else 0
            r = run_under_fire(
                args.broker,
                workdir,
                run=f"hostile-bench-{uuid.uuid4().hex[:6]}",
                rounds=args.rounds,
                clients=args.clients,
                hostile=hostile,
                spread_s=spread,
            )
            results[label] = r
            print(f"\n== {label}: {hostile} hostile messages over {spread:.0f} s")
            print(
                f"server exit {r.server_exit}, clients exit {r.client_exit}, {len(r.rounds)} rounds in {r.seconds:.0f} "
                f"s, accuracy {r.accuracy:.4f}"
            )
            print(
                f"server peak RSS {r.peak_rss_mib:.1f} MiB; server log {r.log_bytes / 1024:.0f} KiB, longest line "
                f"{r.longest_log_line} chars"
            )
            print(f"accounting exit {r.accounting_exit}: {skipped_line(r.accounting)}")
            print(f"replay --check exit {r.replay_exit}: {skipped_line(r.replay)}")
            if hostile:
                from collections import Counter

                kinds = Counter(m.category.split(":")[0] for m in r.sent)
                print(
                    f"sent {len(r.sent)} (the broker itself refused {r.refused_by_broker}): "
                    + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
                )
                print(
                    f"dead letters {r.dead_letters}, hostile updates dropped with a record {r.drop_records}, hostile "
                    f"updates folded {len(r.folded_hostile)}, unanswered {sum(map(len, r.unanswered.values()))}"
                )
    clean, fire = results["clean"], results["under fire"]
    ratio = fire.peak_rss_mib / clean.peak_rss_mib
    print(f"\nserver peak RSS under fire / clean: {ratio:.3f} (must be <= 1.2)")
    ok = (
        fire.server_exit == 0
        and fire.accuracy >= 0.93
        and ratio <= 1.2
        and fire.accounting_exit == 0
        and fire.replay_exit == 0
        and not fire.folded_hostile
        and not fire.unanswered
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
