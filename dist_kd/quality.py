"""Quality signals of an encoder that do not depend on the distillation loss: embedding spread and a linear probe.

A falling loss does not say the student is usable: a student whose every sentence maps to nearly the same
vector can still match the teacher's large common component and score a low MSE. Two signals catch that:

- **spread**: the mean pairwise cosine similarity of sentence embeddings over held-out texts: last-layer
  states pooled as the teacher's sentence-transformers modules pool them (:func:`sentence_pool`; mean
  pooling for a teacher without modules). A collapsed encoder gives values near 1; a useful one stays near
  its teacher's.
- **probe**: the k-fold cross-validated accuracy of a multinomial logistic regression trained on the frozen
  embeddings of labelled held-out texts. It is read against the teacher's probe on the same
  folds (a ratio), and against chance (the share of the most frequent class).

The maths are plain tensor functions on ``(N, D)`` embeddings, deterministic for a given seed.
:class:`HeldOutTexts` holds the tokenised texts (and labels) a run evaluates on, read from a task-data
file (``eval.texts``) or taken from held-out corpus shards (``data.eval_shards``, spread only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_kd.config import doc
from dist_kd.data.encode import TokenizedRows, pad_id_of, pad_rows, tokenize_rows, uses_token_types

logger = logging.getLogger(__name__)

# A student is called collapsed when its spread exceeds this (every text close to one direction) ...
COLLAPSED_SPREAD = 0.95
# ... or when its probe accuracy is within this margin of chance.
CHANCE_MARGIN = 0.05


def mean_pool(hidden_BLD: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states: ``(B, L, D)`` and ``(B, L)`` (1 = real) -> ``(B, D)`` fp32."""
    mask = mask_BL.to(hidden_BLD.device, torch.float32)[:, :, None]
    return (hidden_BLD.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def sentence_pool(
    hidden_BLD: torch.Tensor, mask_BL: torch.Tensor, modes: tuple[str, ...] = ("mean_tokens",)
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' Pooling module makes them: each of ``modes``
    (:data:`dist_kd.sentence_modules.POOLING_MODES`) over the real tokens, concatenated, ``(B, len(modes) * D)``
    fp32; rows are right-padded."""
    mask = mask_BL.to(hidden_BLD.device, torch.float32)[:, :, None]
    hidden = hidden_BLD.float()
    lengths = mask.sum(1).clamp_min(1.0)
    parts = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(hidden[:, 0])
        elif mode == "max_tokens":
            parts.append(hidden.masked_fill(mask == 0, -1e9).max(1).values)
        elif mode == "mean_tokens":
            parts.append(mean_pool(hidden_BLD, mask_BL))
        elif mode == "mean_sqrt_len_tokens":
            parts.append((hidden * mask).sum(1) / lengths.sqrt())
        elif mode == "weightedmean_tokens":  # position i (1-based) weighs i
            weights = mask * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)[:, None]
            parts.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        elif mode == "lasttoken":
            last = lengths.long().squeeze(1) - 1
            parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(parts, dim=1)


def pooling_name(modes: Sequence[str]) -> str:
    """Pooling modes in words, e.g. ``mean`` or ``cls + mean`` (concatenated)."""
    return " + ".join(mode.removesuffix("_tokens").removesuffix("_token") for mode in modes)


def pooling_note(quality: dict) -> str:
    """`` (cls pooling, ...)`` where a summary's embeddings were not mean-pooled; nothing for mean pooling."""
    pooling = quality.get("pooling") or "mean"
    return "" if pooling == "mean" else f" ({pooling} pooling, as the teacher's sentence-transformers modules)"


def embedding_spread(embeddings_ND: torch.Tensor | np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct rows (1.0: every row points the same way).

    Uses ``|sum_i u_i|^2 = sum_i |u_i|^2 + sum_{i != j} u_i.u_j`` for the rows scaled to unit length, so it is
    O(N D), not O(N^2 D). A row of zeros (no direction) counts as cosine 0 with every other row.
    """
    x = torch.as_tensor(embeddings_ND, dtype=torch.float64)
    count = x.shape[0]
    if count < 2:
        raise ValueError(f"the spread needs at least 2 embeddings, got {count}")
    _check_finite(x, "the spread")
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    total = unit.sum(0)
    return float((total.dot(total) - unit.pow(2).sum()) / (count * (count - 1)))


def _non_finite_rows(x: torch.Tensor) -> np.ndarray:
    """The rows of ``x`` holding NaN or infinity."""
    return np.flatnonzero((~torch.isfinite(x).all(1)).numpy())


def _check_finite(x: torch.Tensor, what: str) -> None:
    """A NaN made the spread NaN (never flagged as collapsed) and the probe an accuracy read off NaN logits."""
    bad = len(_non_finite_rows(x))
    if bad:
        raise ValueError(f"{what} needs finite embeddings; {bad} of {x.shape[0]} rows hold NaN or infinity")


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """Fold index of each row: every class is spread evenly over the folds, in a seeded order."""
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        folds[rows] = (np.arange(len(rows)) + offset) % num_folds
        offset += len(rows)  # the next class starts where this one ended, so fold sizes stay balanced
    return folds


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> torch.Tensor:
    """Multinomial logistic regression (weights with a bias row) by L-BFGS on the full batch."""
    features = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    weight = torch.zeros(features.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight, y) + l2 * weight[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def linear_probe(
    embeddings_ND: torch.Tensor | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    num_folds: int = 5,
    l2: float = 1e-3,
    seed: int = 0,
    max_iter: int = 200,
) -> float:
    """k-fold cross-validated accuracy of a linear classifier on frozen embeddings.

    Features are standardised with the training folds' mean and standard deviation, so the result does not
    depend on the embeddings' scale (a student and its teacher are compared on equal terms).

    Args:
        embeddings_ND: one embedding per labelled text.
        labels: class index of each text.
        num_classes: C.
        num_folds: k; every row is scored exactly once, by the classifier that did not see it.
        l2: L2 penalty on the (standardised) weights.
        seed: fold assignment.
        max_iter: L-BFGS iterations per fold.

    Returns:
        Accuracy over all rows.
    """
    x = torch.as_tensor(np.asarray(embeddings_ND), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} embeddings but {y.shape[0]} labels")
    _check_finite(x, "the probe")
    if num_folds < 2 or x.shape[0] < num_folds:
        raise ValueError(f"the probe needs num_folds >= 2 and at least num_folds rows, got {num_folds}, {x.shape[0]}")
    folds = torch.as_tensor(stratified_folds(y.numpy(), num_folds, seed))
    smallest = min(int((folds != fold).sum()) for fold in range(num_folds))
    if smallest < 2:  # one training row has no standard deviation: the probe was computed from NaN
        raise ValueError(f"the probe needs at least 2 training rows in each of its {num_folds} folds; "
                         f"{x.shape[0]} rows leave {smallest}")  # fmt: skip
    correct = 0
    for fold in range(num_folds):
        test = folds == fold
        train_x, train_y = x[~test], y[~test]
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)
        weight = _fit_logistic((train_x - mean) / std, train_y, num_classes, l2, max_iter)
        test_x = torch.cat([(x[test] - mean) / std, torch.ones(int(test.sum()), 1, dtype=x.dtype)], dim=1)
        correct += int(((test_x @ weight).argmax(1) == y[test]).sum())
    return correct / x.shape[0]


@dataclass
class QualityReport:
    """Spread and probe of one encoder (``probe`` is None without labelled texts)."""

    spread: float
    probe: float | None = None


def collapse_reasons(report: QualityReport, chance: float | None, teacher: QualityReport | None = None) -> list[str]:
    """Why ``report`` looks like a collapsed encoder (empty when it does not). Each reason starts with its
    kind, two words (``embedding spread``, ``probe accuracy``): :func:`reason_kind`.

    The probe is near chance within ``CHANCE_MARGIN``, or within half the room above chance where that is less
    (a most frequent class of 0.95 or more left none: a perfect probe was "near chance"); and only where the
    teacher's probe is not near chance too (on texts of one dominant class the probe tells nothing).

    Args:
        report: the encoder's figures.
        chance: the probe accuracy of always predicting the most frequent class (None: no probe).
        teacher: the teacher's figures on the same texts (None: not compared).
    """
    reasons = []
    if report.spread > COLLAPSED_SPREAD:
        reasons.append(f"embedding spread {report.spread:.3f} > {COLLAPSED_SPREAD} (its sentences all look alike)")
    if report.probe is not None and chance is not None:
        near = chance + min(CHANCE_MARGIN, (1.0 - chance) / 2)
        teacher_above = teacher is None or teacher.probe is None or teacher.probe >= near
        if report.probe < near and teacher_above:
            reasons.append(f"probe accuracy {report.probe:.3f} is near chance ({chance:.3f})")
    return reasons


def reason_kind(reason: str) -> str:
    """The kind of a :func:`collapse_reasons` reason: its first two words."""
    return " ".join(reason.split()[:2])


@dataclass
class QualityConfig:
    """Quality signals of the student on held-out text, logged at eval steps (``eval`` section)."""

    every: int | None = doc("optimizer steps between evaluations (null: at the start and the end only)", None)
    texts: str | None = doc(
        "held-out texts for spread and probe: a task-data file (TSV/CSV/JSONL/Parquet/datasets dir); "
        "null: the sequences of data.eval_shards (spread only)",
        None,
        path=True,
    )
    text: str = doc("column of the texts in eval.texts", "text")
    label: str | None = doc("column of the probe's labels in eval.texts (null: spread only)", "label")
    max_texts: int = doc(
        "use at most this many texts (the first ones; of data.eval_shards too, after data.eval_batches)", 2000
    )
    max_length: int = doc("truncate each text to this many pieces", 128)
    batch_size: int = doc("texts per forward pass", 64)
    folds: int = doc("folds of the cross-validated linear probe", 5)

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ValueError(f"eval.every must be >= 1 or null, got {self.every}")
        for name in ("max_texts", "max_length", "batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"eval.{name} must be >= 2, got {getattr(self, name)}")
        if self.folds < 2:
            raise ValueError(f"eval.folds must be >= 2, got {self.folds}")


Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class HeldOutTexts:
    """Tokenised held-out texts (and optional class labels) on which encoders are compared.

    Args:
        rows: the tokenised texts.
        labels: ``(N,)`` class ids, or None (spread only).
        label_names: the class names behind the ids.
        source: where the texts came from (for messages).
        pad_id: the tokenizer's padding id.
        use_token_types: pass segment ids to the encoder (BERT) or not (RoBERTa).
    """

    def __init__(
        self,
        rows: TokenizedRows,
        labels: np.ndarray | None,
        label_names: list[str],
        source: str,
        pad_id: int,
        use_token_types: bool,
    ):
        if len(rows) < 2:
            raise ValueError(f"held-out texts {source}: need at least 2 texts, found {len(rows)}")
        self.rows, self.labels, self.label_names = rows, labels, label_names
        self.source, self.pad_id, self.use_token_types = source, pad_id, use_token_types
        # How the embeddings are pooled: the teacher's sentence-transformers modules (use_pooling_of), else mean.
        self.pooling: tuple[str, ...] = ("mean_tokens",)

    def use_pooling_of(self, model_dir: str | Path) -> None:
        """Pool as ``model_dir``'s sentence-transformers modules do (the ones its students are exported with),
        so that the figures measure the embeddings users get; mean pooling where it has none.

        A ``Normalize`` module is left out: it does not change the spread (a cosine), and the probe reads the
        embeddings before it, as for a teacher without modules, so that figures stay comparable across teachers
        and releases.
        """
        from dist_kd.sentence_modules import modules_after_pooling, sentence_pooling

        found = sentence_pooling(model_dir)
        if found is not None:
            self.pooling = found[0]
            after = modules_after_pooling(model_dir)
            if after:  # a Dense (LaBSE): SentenceTransformer(student) gives other embeddings than those measured
                logger.warning(
                    "%s: quality is measured on the pooled states, without its %s module(s) after the pooling: the "
                    "spread and probe are not those of SentenceTransformer's embeddings", model_dir, ", ".join(after),
                )  # fmt: skip

    @property
    def pooling_name(self) -> str:
        """The pooling in words, e.g. ``mean`` or ``cls + mean`` (concatenated)."""
        return pooling_name(self.pooling)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, cfg: QualityConfig) -> HeldOutTexts:
        """Texts (and labels, when ``cfg.label`` is set) from a task-data file; labels are sorted names.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a missing column (naming the file and the columns found), a row without text or label,
                fewer than 2 classes, or fewer texts than probe folds.
        """
        from dist_kd.data.tasks import RowPlaces, TaskSpec, read_raw_table

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"eval.texts {path} does not exist (a task-data file of held-out texts)")
        spec = TaskSpec(name="eval", type="regression", text_a=cfg.text, text_b=None, label=cfg.label, metric="pearson")
        table, _ = read_raw_table(path, spec)
        wanted = [cfg.text] + ([cfg.label] if cfg.label else [])
        missing = [column for column in wanted if column not in table.column_names]
        if missing:
            fix = " (or eval.label=null: the spread alone, no probe)" if missing[0] == cfg.label else ""
            raise ValueError(
                f"eval.texts {path}: no column {missing[0]!r} (eval.text / eval.label); columns found: "
                f"{table.column_names}: name the column{fix}"
            )
        where = RowPlaces(path, spec, "utf-8", table.num_rows)  # the rows' lines in the file, for the errors
        table = table.slice(0, cfg.max_texts)
        texts = table.column(cfg.text).to_pylist()
        empty = [row for row, text in enumerate(texts) if not text]
        if empty:
            raise ValueError(f"eval.texts {path}: {where.subject(empty, limit=5)} no text in column {cfg.text!r}")
        labels, names = None, []
        if cfg.label:
            cells = table.column(cfg.label).to_pylist()
            unlabelled = [row for row, cell in enumerate(cells) if cell is None or cell == ""]
            if unlabelled:
                raise ValueError(
                    f"eval.texts {path}: {where.subject(unlabelled, limit=5)} no label in column {cfg.label!r}: the "
                    "probe needs every text's label (eval.label=null measures the spread alone)"
                )
            score = next((cell for cell in cells if isinstance(cell, float) and not cell.is_integer()), None)
            if score is not None:  # every distinct score was a class: 58 classes of 60 texts, a meaningless probe
                raise ValueError(
                    f"eval.texts {path}: column {cfg.label!r} holds scores (e.g. {score}), not classes; the probe "
                    "needs class labels (eval.label=null measures the spread alone)"
                )
            names = sorted({str(cell) for cell in cells})
            if len(names) < 2:
                raise ValueError(f"eval.texts {path}: the probe needs at least 2 classes in {cfg.label!r}, got {names}")
            labels = np.array([names.index(str(cell)) for cell in cells], dtype=np.int64)
            if len(labels) < cfg.folds or len(labels) - math.ceil(len(labels) / cfg.folds) < 2:
                raise ValueError(
                    f"eval.texts {path}: {len(labels)} texts are too few for eval.folds={cfg.folds} (each fold "
                    "trains the probe on the others: at least 2 texts there)"
                )
        rows = tokenize_rows(tokenizer, [str(text) for text in texts], [None] * len(texts), cfg.max_length,
                             "eval.max_length")  # fmt: skip
        return cls(rows, labels, names, str(path), pad_id_of(tokenizer), uses_token_types(tokenizer))

    @classmethod
    def from_sequences(
        cls, sequences: list[np.ndarray], tokenizer, source: str, max_length: int | None = None
    ) -> HeldOutTexts:
        """Unlabelled token sequences (held-out corpus shards), spread only; each cut to ``max_length`` pieces
        (``eval.max_length``, as texts are), its last piece ([SEP]) kept.

        Raises:
            ValueError: a sequence without tokens (a row of a damaged shard, fully masked): it would pool to a
                zero vector, of cosine 0 with every text, and make a collapsed student look spread.
        """
        if any(len(sequence) == 0 for sequence in sequences):
            raise ValueError(f"held-out texts {source}: a sequence without tokens")
        if max_length is not None:
            cut = [np.concatenate([s[: max_length - 1], s[-1:]]) if len(s) > max_length else s for s in sequences]
            sequences = cut
        lengths = np.array([len(sequence) for sequence in sequences], dtype=np.int64)
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)
        rows = TokenizedRows(ids=ids, types=np.zeros(len(ids), np.int8), offsets=offsets)
        return cls(rows, None, [], source, pad_id_of(tokenizer), uses_token_types(tokenizer))

    @property
    def chance(self) -> float | None:
        """Probe accuracy of always answering the most frequent class (None without labels)."""
        if self.labels is None:
            return None
        return float(np.bincount(self.labels).max() / len(self.labels))

    @torch.no_grad()
    def embeddings(self, forward: Forward, device: torch.device, batch_size: int) -> torch.Tensor:
        """``(N, D)`` pooled last states of ``forward`` (a batch -> ``(B, L, D)``), in row order (:attr:`pooling`)."""
        from dist_kd.predict import length_batches

        out: torch.Tensor | None = None
        for batch_rows in length_batches(self.rows.lengths, batch_size):
            batch = {name: tensor.to(device) for name, tensor in pad_rows(self.rows, batch_rows, self.pad_id).items()}
            if not self.use_token_types:
                batch.pop("token_type_ids")
            pooled = sentence_pool(forward(batch), batch["attention_mask"], self.pooling).cpu()
            if out is None:
                out = torch.empty(len(self.rows), pooled.shape[1], dtype=torch.float32)
            out[torch.from_numpy(batch_rows)] = pooled
        assert out is not None  # at least 2 rows (checked in __init__)
        return out

    def report(
        self, forward: Forward, device: torch.device, batch_size: int, folds: int, name: str = "the encoder"
    ) -> QualityReport:
        """Spread (and probe, with labels) of the encoder behind ``forward`` (``name``, for the error).

        Raises:
            ValueError: embeddings that are not finite (an fp16 model overflowing): the spread was NaN, never
                flagged, and the probe a number read off NaN logits, which looked like an accuracy.
        """
        embeddings = self.embeddings(forward, device, batch_size)
        bad = _non_finite_rows(embeddings)
        if len(bad):
            raise ValueError(
                f"{name} gives embeddings that are not finite (NaN or infinity) for {len(bad)} of {len(embeddings)} "
                f"held-out texts of {self.source} (rows {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}"
                "); a model run in fp16 overflows so: run it in bf16 or fp32"
            )
        probe = None
        if self.labels is not None:
            probe = linear_probe(embeddings, self.labels, len(self.label_names), num_folds=folds)
        return QualityReport(spread=embedding_spread(embeddings), probe=probe)


def last_states(model: torch.nn.Module) -> Forward:
    """A :data:`Forward` over an HF encoder: its last hidden states, in eval mode (restored afterwards)."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(**batch).last_hidden_state
        finally:
            model.train(was_training)

    return forward
