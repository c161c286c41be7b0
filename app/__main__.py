"""``python -m app`` is the same as the ``clopos-hydrator`` command."""

import sys

from app.cli import main

sys.exit(main())
