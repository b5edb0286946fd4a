"""The server's reassembly of one round's updates, alone: CPU and page faults.

    python benchmarks/reassembly.py [--messages 4] [--mb 40] [--allocator lean] [--repeat 5]

``--messages`` chunked bodies of ``--mb`` MB (16 MiB chunks, brokerfl's), their chunks
interleaved as several clients' updates arrive at the server's queue, fed to a
``chunks.Assembler`` with the server's spill setting (one message reassembled in RAM at a
time, the others spilled to a temporary file and read back whole). Prints, per round of
messages, the wall and CPU milliseconds and the process's minor page faults, under the
allocator setting given (``lean``: the server's; each body is then a fresh mapping). A
fault per 4 KiB page of a 40 MB body is ~9,800 faults; a body backed by huge pages
(``brokerfl.transports.memory.advise_huge_pages``) takes a few dozen.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brokerfl.transports.amqp import chunks  # noqa: E402
from brokerfl.transports.memory import allocator_mode, tune_allocator  # noqa: E402

CHUNK = 16 * 1024**2  # AmqpTransport's chunk_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=4)
    parser.add_argument("--mb", type=float, default=40.0)
    parser.add_argument("--allocator", default="lean", choices=["lean", "tuned", "default"])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tune_allocator(args.allocator)
    size = int(args.mb * 1e6)
    names = [f"m{i}" for i in range(args.messages)]
    parts = {name: list(chunks.split(os.urandom(size), CHUNK, name)) for name in names}
    rows = []
    for _ in range(args.repeat + 1):  # the first is a warm-up
        assembler = chunks.Assembler(spill_min_bytes=chunks.SPILL_MIN_BYTES)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        wall, cpu = time.perf_counter(), time.process_time()
        for index in range(max(len(p) for p in parts.values())):
            for name in names:
                if index < len(parts[name]):
                    part, headers = parts[name][index]
                    outcome = assembler.add(chunks.parse(headers), part, handle=(name, index), sender=name)
                    if isinstance(outcome, chunks.Complete):
                        assert len(outcome.body) == size
                        del outcome  # folded and dropped, as the server does
        rows.append(
            (
                time.perf_counter() - wall,
                time.process_time() - cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            )
        )
    rows = rows[1:]
    print(
        f"{args.messages} interleaved messages of {args.mb:g} MB, allocator {allocator_mode()}: "
        f"wall {statistics.median(r[0] for r in rows) * 1000:.0f} ms, CPU "
        f"{statistics.median(r[1] for r in rows) * 1000:.0f} ms, "
        f"minor faults {statistics.median(r[2] for r in rows):,.0f} per round (medians of {args.repeat}); load "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
