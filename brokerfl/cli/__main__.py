import sys

from brokerfl.cli.main import main

sys.exit(main())
