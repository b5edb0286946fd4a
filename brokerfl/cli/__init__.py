"""The ``brokerfl`` command (entry point ``brokerfl.cli:main``; ``python -m brokerfl.cli``).

:mod:`~brokerfl.cli.commands` parses and runs the commands, :mod:`~brokerfl.cli.operate` has
status and admin, :mod:`~brokerfl.cli.common` what both use.
"""

from brokerfl.cli.commands import main

__all__ = ["main"]
