"""``python -m histokd`` = the ``histokd`` command."""

import sys

from histokd.cli import main

sys.exit(main())
