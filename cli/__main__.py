"""``python -m cli ...`` (and ``accelerate launch -m cli train-lora ...``): the ``ldm`` command."""
import sys

from cli.main import main

sys.exit(main())
