"""An attacker's connection to the broker: plain pika, no brokerfl transport, publishing
:class:`~tests.tools.hostile.messages.HostileMessage` s as they are (garbage properties too)."""

from __future__ import annotations

import struct

from brokerfl.transports.topology import RunTopology
from tests.tools.hostile.messages import HostileMessage, RawTimestamp


class HostilePublisher:
    """An attacker's connection: plain pika, publishing to the run's exchange (or straight to
    its server queue), with confirms in windows."""

    def __init__(self, url: str, topology: RunTopology) -> None:
        import pika
        import pika.data

        self._pika = pika
        self.topology = topology
        encode_value = pika.data.encode_value
        if not getattr(encode_value, "_writes_raw_timestamps", False):

            def encode_raw(pieces, value):  # only RawTimestamp differs from pika's own
                if isinstance(value, RawTimestamp):
                    pieces.append(struct.pack(">cQ", b"T", int(value)))
                    return 9
                return encode_value(pieces, value)

            encode_raw._writes_raw_timestamps = True
            pika.data.encode_value = encode_raw
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.refused = 0  # publishes the broker itself refused (it closed our channel or connection)
        self._url = url

    def publish(self, message: HostileMessage) -> bool:
        """True if the broker took it."""
        pika = self._pika
        exchange, key = (
            (self.topology.exchange, message.routing_key) if message.routing_key else ("", self.topology.server_queue)
        )
        try:
            self.channel.basic_publish(exchange, key, message.body, pika.BasicProperties(**message.properties))
            return True
        except (pika.exceptions.AMQPError, ValueError, TypeError, struct.error, OverflowError):
            self.refused += 1
            self._reopen()
            return False

    def _reopen(self) -> None:
        pika = self._pika
        try:
            if self.connection.is_open:
                self.channel = self.connection.channel()
                return
        except pika.exceptions.AMQPError:
            pass
        self.connection = pika.BlockingConnection(pika.URLParameters(self._url))
        self.channel = self.connection.channel()

    def sync(self) -> None:
        """Wait until the broker has everything published so far (a round trip)."""
        self.connection.process_data_events(0)
        self.channel.queue_declare(self.topology.server_queue, passive=True)

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:  # already closed by the broker
            pass
