"""``python -m mergelab.report``: see :mod:`mergelab.report`."""

import sys

from . import main

sys.exit(main())
