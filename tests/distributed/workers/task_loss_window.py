"""2-rank worker: task-distillation loss terms and their log window when only one rank has labelled rows.

A micro-batch of 8 rows, 4 per rank; only rank 0's slice holds labelled (original) rows, rank 1's are all
augmented. Each rank computes its prediction loss with the trainer's ``hard_rows`` (the micro-batch's
labelled count over the world size) and backpropagates; the gradients are averaged across ranks as a
data-parallel engine does. Then each rank feeds a log window and reduces it. Writes OUT/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_kd import distributed
from dist_kd.losses import prediction_loss
from dist_kd.train.common import LossWindow


def main(out_dir: str) -> None:
    info = distributed.init_distributed(force_cpu=True)
    try:
        generator = torch.Generator().manual_seed(0)
        logits_all = torch.randn(8, 3, generator=generator)
        probs_all = torch.softmax(torch.randn(8, 3, generator=generator), dim=-1)
        labels_all = torch.tensor([2, 0, -1, 1, -1, -1, -1, -1])
        mask_all = labels_all >= 0
        mine = slice(4 * info.rank, 4 * info.rank + 4)
        logits = logits_all[mine].clone().requires_grad_(True)
        hard_rows = float(mask_all.sum()) / info.world_size
        terms = prediction_loss(logits, probs_all[mine], labels_all[mine].clamp_min(0), soft_weight=0.5,
                                hard_weight=0.5, label_mask=mask_all[mine], hard_rows=hard_rows)  # fmt: skip
        terms["loss"].backward()
        grad = logits.grad.clone()
        gathered = [torch.zeros_like(grad) for _ in range(info.world_size)]
        dist.all_gather(gathered, grad / info.world_size)  # the engine's averaging, kept per row here

        window = LossWindow(torch.device("cpu"), ["topic"])
        window.add({name: value.detach() for name, value in terms.items()}, tokens=10, rows=4, group="topic")
        stats = window.reduce()
        values, batches = stats.values, stats.batches
        result = {
            "terms": sorted(terms),
            "hard": terms["hard"].item(),
            "grad": torch.cat(gathered).tolist(),
            "values": values,
            "batches": batches,
            "tokens": stats.tokens,
            "rows": stats.rows,
        }
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
