"""Send one large body through RabbitMQ with the AMQP transport and print MB/s.

    python benchmarks/large_body.py [--mb 300] [--chunk-mib 16] [--url amqp://...]

Publishes once (chunked, confirmed), then consumes and reassembles it with prefetch=1,
checks it byte for byte, and deletes its queue.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

from brokerfl.transports.amqp import AmqpTransport
from brokerfl.wire.message import Envelope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--mb", type=int, default=300, help="body size in MB (10^6 bytes)")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--queue-kind", default="quorum", choices=["classic", "quorum"])
    args = parser.parse_args()

    body = os.urandom(args.mb * 10**6)
    queue = f"brokerfl.bench-{uuid.uuid4().hex[:8]}.server"
    chunk_size = args.chunk_mib * 1024**2
    room = max(512 * 1024**2, 2 * len(body))
    with (
        AmqpTransport(args.url, chunk_size=chunk_size) as producer,
        # room for the whole body, as a run's max_message_mib gives its processes
        AmqpTransport(
            args.url, chunk_size=chunk_size, max_partial_bytes_per_sender=room, max_partial_bytes=room
        ) as consumer,
    ):
        producer.declare_queue(queue, kind=args.queue_kind)
        try:
            envelope = Envelope("bench", uuid.uuid4().hex, "bench", time.time(), {})
            started = time.perf_counter()
            producer.publish("", queue, envelope, body)
            published = time.perf_counter()
            got = []
            consumer.consume(queue, got.append, prefetch=1)
            while not got:
                consumer.poll(1.0)
            received = time.perf_counter()
            assert got[0].body == body, "body differs"
            consumer.ack(got[0])
            chunks = -(-len(body) // chunk_size)
            mb = len(body) / 1e6
            print(f"{mb:.0f} MB in {chunks} chunks of {args.chunk_mib} MiB ({args.queue_kind} queue)")
            print(f"publish (confirmed): {published - started:6.2f} s  {mb / (published - started):7.1f} MB/s")
            print(f"consume + reassemble: {received - published:6.2f} s  {mb / (received - published):7.1f} MB/s")
            print(f"end to end:          {received - started:6.2f} s  {mb / (received - started):7.1f} MB/s")
        finally:
            producer.delete_queue(queue)


if __name__ == "__main__":
    main()
