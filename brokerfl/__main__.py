import sys

from brokerfl.cli.commands import main

sys.exit(main())
