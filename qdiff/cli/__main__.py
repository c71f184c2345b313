"""``python -m qdiff.cli``: the ``qdiff`` command."""

import sys

from qdiff.cli import main

sys.exit(main())
