"""``python -m dist_kd COMMAND ...`` (also under torchrun ``-m`` and the deepspeed launcher's ``--module``)."""

import sys

from dist_kd.main import main

sys.exit(main())
