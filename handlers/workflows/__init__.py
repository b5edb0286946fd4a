"""Workflows: the handler sets the roles run (who sends what to whom, and when).

``server`` (synchronous rounds) and ``async_server`` (asynchronous strategies) are the
server's; ``client`` is the client's.
"""
