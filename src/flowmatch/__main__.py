"""``python -m flowmatch``: the ``flowmatch`` command."""

import sys

from flowmatch.cli.main import main

sys.exit(main())
