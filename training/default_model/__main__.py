"""``python -m training.default_model <stage> [options]``: see the package docstring."""
import sys

from .cli import main

sys.exit(main())
