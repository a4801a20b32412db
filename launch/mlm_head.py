"""Fit a masked-LM head on a frozen encoder, for TinyBERT augmentation when no BERT masked-LM is at hand.

    python launch/mlm_head.py --encoder DIR --shards data/quickstart/shards --output runs/mlm [--steps 300]

The encoder (e.g. all-MiniLM-L6-v2, published without its MLM head) stays frozen; a fresh prediction head
tied to its input embeddings learns to predict masked pieces of the corpus. The output is an HF
``*ForMaskedLM`` directory for ``launch/augment.py --mlm``, with ``mlm.json`` (held-out top-1 / top-k
accuracy before and after). Bad input is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    from dist_kd.cli import add_log_level_argument, bad_input, configure_logging, positive_float, positive_int
    from dist_kd.mlm import MlmHeadConfig, fit_mlm_head

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True, help="HF directory of the encoder (with tokenizer)")
    parser.add_argument("--shards", required=True, help="corpus shards (launch/prepare_corpus.py) in its tokenizer")
    parser.add_argument("--output", required=True, help="output directory (HF *ForMaskedLM)")
    defaults = MlmHeadConfig()
    checked = {"steps": positive_int, "batch_size": positive_int, "eval_batches": positive_int, "top_k": positive_int,
               "lr": positive_float}  # fmt: skip
    for name in ("steps", "batch_size", "lr", "mask_prob", "eval_batches", "top_k", "seed", "train_layers"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=checked.get(name, type(value)), default=value)
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    configure_logging(0, level=args.log_level)
    try:
        cfg = MlmHeadConfig(**{name: value for name, value in vars(args).items() if name != "log_level"})
        result = fit_mlm_head(cfg)
    except (ValueError, OSError) as err:  # OSError: an output it cannot write
        return bad_input(err)
    print(json.dumps({"output": args.output, **{k: result[k] for k in ("held_out_before", "held_out_after")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
