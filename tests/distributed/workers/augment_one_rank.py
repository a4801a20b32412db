"""Worker: launch/augment.py with rank 1 patched (MODE=setup: its GloVe file is missing on that node;
MODE=metadata: its data cannot be read when the run key is made; MODE=hash: rank 1 may not hash the masked-LM
or the data, which rank 0 does for all); exits with augment's exit code."""

from __future__ import annotations

import os
import sys

import dist_kd.data.augment as aug
from dist_kd.testing import fail_on_rank
from launch.augment import main

if __name__ == "__main__":
    if os.environ["MODE"] == "setup":
        aug.build_augmenter = fail_on_rank(aug.build_augmenter, FileNotFoundError("GloVe /node2/glove.txt is gone"))
    elif os.environ["MODE"] == "metadata":
        aug.build_metadata = fail_on_rank(aug.build_metadata, OSError("/node2/data: Input/output error"))
    else:
        aug.input_digests = fail_on_rank(aug.input_digests, RuntimeError("rank 1 hashed the inputs"))
    sys.exit(main(sys.argv[1:]))
