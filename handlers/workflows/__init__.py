"""Workflows: the handler sets the roles run (who sends what to whom, and when).

``server`` (synchronous rounds), ``async_server`` (asynchronous strategies), ``cyclic`` and
``swarm`` are the coordinator's, each on the ``lifecycle`` set and the operations of
``server_state``; ``admin`` (the operator's) and ``cross_site`` are added by
:mod:`brokerfl.assembly.roles` per run; ``client`` is the client's. Each module exports its sets;
none registers on another's.
"""
