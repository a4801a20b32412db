"""Worker: launch/augment.py with rank 1 patched (MODE=setup: its GloVe file is missing on that node;
MODE=metadata: its data cannot be read when the run key is made; MODE=hash: rank 1 may not hash the masked-LM
or the data, which rank 0 does for all); exits with augment's exit code."""

from __future__ import annotations

import os
import sys

import dist_kd.data.augment as aug
from launch.augment import main


def _fail_on_rank_1(function, error: Exception):
    def patched(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise error
        return function(*args, **kwargs)

    return patched


if __name__ == "__main__":
    if os.environ["MODE"] == "setup":
        aug.build_augmenter = _fail_on_rank_1(aug.build_augmenter, FileNotFoundError("GloVe /node2/glove.txt is gone"))
    elif os.environ["MODE"] == "metadata":
        aug.build_metadata = _fail_on_rank_1(aug.build_metadata, OSError("/node2/data: Input/output error"))
    else:
        aug.input_digests = _fail_on_rank_1(aug.input_digests, RuntimeError("rank 1 hashed the inputs"))
    sys.exit(main(sys.argv[1:]))
