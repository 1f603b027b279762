"""``python -m dinodet ...`` is the same as the ``dinodet`` command."""
import sys

from .cli import main

sys.exit(main())
