"""Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017): the server
learns the sum of a round's updates and nothing about any one of them.

The arithmetic only, no messaging (the handler sets are ``handlers/workflows/secure_server.py``
and ``handlers/workflows/secure_client.py``; replay uses :func:`protocol.unmask` too):

- :mod:`.shamir`: t-of-n secret sharing over the prime field GF(2^521 - 1);
- :mod:`.crypto`: X25519 key agreement with HKDF-SHA256, AES-GCM for the shares in transit,
  AES-256-CTR as the masks' pseudo-random generator;
- :mod:`.quantise`: a client's float delta to integers mod 2^m, and the sum back;
- :mod:`.protocol`: the neighbour graph, a client's session with its invariants, and the
  server's unmasking (with :func:`.protocol.can_unmask`, whether the reveals so far suffice).

Pure functions and one state machine per client: no I/O, no threads; every secret from the
OS's CSPRNG, never a seeded generator.
"""
