"""Task losses on 2 ranks when only one rank's slice has labelled rows: same terms on both ranks, a hard
term that is the mean over the whole micro-batch's labelled rows, and a log window that reduces cleanly."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.distributed


def _reference():
    """The same micro-batch on one process: soft CE over all 8 rows, hard CE over the 3 labelled rows."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator).requires_grad_(True)
    probs = torch.softmax(torch.randn(8, 3, generator=generator), dim=-1)
    labels = torch.tensor([2, 0, -1, 1, -1, -1, -1, -1])
    log_p = torch.log_softmax(logits, dim=-1)
    soft = -(probs * log_p).sum(1).mean()
    rows = (labels >= 0).nonzero().squeeze(1)
    hard = -log_p[rows, labels[rows]].mean()
    (0.5 * soft + 0.5 * hard).backward()
    return logits.grad, soft.item(), hard.item()


def test_hard_term_and_log_window_with_labels_on_one_rank(ranks, tmp_path):
    ranks("task_loss_window.py", str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["terms"] == results[1]["terms"] == ["hard", "loss", "soft"]
    assert results[1]["hard"] == 0.0  # no labelled row on rank 1, yet the term is there

    grad, soft, hard = _reference()
    # Averaged over ranks, the gradient is the single-process one: each labelled row weighs 1/3, not 1/3 on
    # rank 0 plus nothing on rank 1 averaged to 1/6.
    torch.testing.assert_close(torch.tensor(results[0]["grad"]), grad)

    for result in results:  # both ranks log the same line
        values = result["values"]
        assert values["soft"] == pytest.approx(soft, rel=1e-5)
        assert values["hard"] == pytest.approx(hard, rel=1e-5)
        assert values["loss"] == pytest.approx(0.5 * soft + 0.5 * hard, rel=1e-5)
        assert values["task/topic"] == values["loss"]
        assert result["batches"]["task/topic"] == 1
        assert (result["tokens"], result["rows"]) == (20, 8)  # each rank's 10 tokens and 4 rows, summed
        assert "embd" not in values  # terms nobody produced are left out, not logged as 0
