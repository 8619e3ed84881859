"""``python -m genco.cli``."""

import sys

from genco.cli.main import main

sys.exit(main())
