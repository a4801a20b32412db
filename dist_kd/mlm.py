"""A masked-LM for augmentation when none is at hand: fit an MLM head on a frozen encoder over a corpus.

TinyBERT's augmentation ranks replacement word pieces with a BERT masked-LM. Encoders published for
sentence embeddings (all-MiniLM-L6-v2 among them) ship without their MLM head, and no BERT masked-LM can be
installed offline here. Their token states still say a lot about the masked word, so this module loads the
encoder as ``AutoModelForMaskedLM`` (a fresh prediction head whose output matrix is tied to the frozen input
embeddings), freezes the encoder and trains the head's transform and output bias on masked tokens of a
prepared corpus (``launch/prepare_corpus.py`` shards). Only the masked positions go through the head.

The result is an ordinary HF ``*ForMaskedLM`` directory (with the tokenizer and ``mlm.json``: steps, loss,
held-out top-1 / top-k accuracy of the fitted head against the untrained one) that ``launch/augment.py
--mlm`` takes as it is.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dist_kd.config import doc, paths_as_text
from dist_kd.data.tokenizer import save_tokenizer
from dist_kd.io import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

RESULT_FILE = "mlm.json"


@dataclass
class MlmHeadConfig:
    """Fitting an MLM head on a frozen encoder."""

    encoder: str = doc("HF directory of the encoder (with tokenizer)", "")
    shards: str = doc("corpus shards of launch/prepare_corpus.py, tokenised with the encoder's tokenizer", "")
    output: str = doc("output directory (an HF *ForMaskedLM directory)", "")
    steps: int = doc("optimizer steps", 300)
    batch_size: int = doc("sequences per step", 16)
    lr: float = doc("peak learning rate (linear warmup over 5 % of the steps, then linear decay)", 1e-3)
    mask_prob: float = doc("share of the real tokens chosen for prediction (BERT: 0.15)", 0.15)
    eval_batches: int = doc("held-out batches (taken from the start of the stream, never trained on)", 8)
    top_k: int = doc("k of the reported top-k accuracy (augmentation's K)", 15)
    seed: int = doc("seed of masking and head init", 0)
    train_layers: int = doc("also train the encoder's top N transformer layers (0: head only)", 0)

    def __post_init__(self):
        paths_as_text(self)  # mlm.json, written after the training, holds them
        if self.train_layers < 0:
            raise ValueError(f"train_layers must be >= 0, got {self.train_layers}")
        for name in ("steps", "batch_size", "eval_batches", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # inf trained to nan and was saved
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63 - 1:
            # torch's generators take 0..2**64-1 but overflowed past int64 ("Overflow when unpacking long long",
            # after the encoder loaded); the masking generator is seeded with seed + 1
            raise ValueError(f"seed (--seed) must be a whole number in 0..2**63-2, got {self.seed!r}")


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose ``prob`` of the real, non-special tokens; of those 80 % become ``mask_id``,
    10 % a random piece, 10 % stay. Returns ``(masked input ids, (B, L) bool of the chosen positions)``."""
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
    chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & candidates
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = torch.randint(vocab_size, (int(swap.sum()),), generator=generator)
    return masked, chosen


class MlmHead:
    """An encoder loaded as a masked-LM with only its prediction head trainable.

    Args:
        encoder_dir: HF directory of the encoder.
        seed: head initialisation.
    """

    def __init__(self, encoder_dir: str | Path, seed: int = 0, train_layers: int = 0):
        from transformers import AutoModelForMaskedLM

        from dist_kd.data.tokenizer import load_tokenizer, require_special_tokens
        from dist_kd.models.teacher import check_model_dir, load_pretrained

        self.encoder_dir = check_model_dir(encoder_dir, "encoder")
        self.tokenizer = load_tokenizer(self.encoder_dir)
        require_special_tokens(
            self.tokenizer, self.encoder_dir, ("mask",), f"encoder {self.encoder_dir}: its tokenizer"
        )
        torch.manual_seed(seed)
        try:  # the head this fits is missing from the encoder's files: expected, not said
            self.model, loading = load_pretrained(AutoModelForMaskedLM, self.encoder_dir, "encoder", new_head=True)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            raise ValueError(
                f"encoder {self.encoder_dir}: transformers has no masked-LM class for it ({err})"
            ) from None
        self.encoder = self.model.base_model
        # A checkpoint that ships its masked-LM head (a full BERT's) loads it: the fit goes on from that head.
        prefix = f"{self.model.base_model_prefix}."
        head_names = [name for name, _ in self.model.named_parameters() if not name.startswith(prefix)]
        missing = set(loading.get("missing_keys") or ())
        self.head_from_checkpoint = bool(head_names) and not any(name in missing for name in head_names)
        if self.head_from_checkpoint:
            logger.info(
                "encoder %s ships a masked-LM head: the fit goes on from it, and held_out_before is that head's "
                "figures (such a checkpoint can also be given to --mlm as it is)", self.encoder_dir,
            )  # fmt: skip
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)  # the output matrix is tied to these input embeddings: frozen too
        from dist_kd.models.capture import find_layer_list

        _, _, layers = find_layer_list(self.encoder)
        if train_layers > len(layers):
            raise ValueError(f"train_layers {train_layers} exceeds the encoder's {len(layers)} layers")
        self.trains_encoder = train_layers > 0
        for layer in list(layers)[len(layers) - train_layers :]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        self.head_parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not self.head_parameters:
            raise ValueError(f"encoder {self.encoder_dir}: its masked-LM has no head parameters to fit")
        self.head = self.model.get_output_embeddings()
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``(P, V)`` vocabulary logits at the ``(B, L)`` bool ``positions`` (encoder under no_grad)."""
        prediction_head = _prediction_head(self.model)
        if prediction_head is None:  # the head's parts sit on the model itself: the whole forward, every position
            self.model.eval()  # the heads have no dropout; the encoder's stays off, as below
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[positions]
        self.encoder.eval()
        with torch.set_grad_enabled(self.trains_encoder and torch.is_grad_enabled()):
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return prediction_head(states[positions])

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        save_tokenizer(self.tokenizer, directory)


def _prediction_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module mapping final states to vocabulary logits (``cls`` in BERT, ``lm_head`` in RoBERTa); None
    where the head's layers are attributes of the model itself (DistilBERT, ELECTRA, ModernBERT)."""
    for name in ("cls", "lm_head", "predictions"):
        if hasattr(model, name):
            return getattr(model, name)
    return None


@torch.no_grad()
def masked_accuracy(
    head: MlmHead, batches: list[dict[str, torch.Tensor]], cfg: MlmHeadConfig, seed: int
) -> dict[str, float]:
    """Top-1 / top-k accuracy and loss at masked positions of ``batches`` (fixed masks from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    hits1 = hitsk = total = 0
    loss = 0.0
    for batch in batches:
        masked, chosen = _mask(head, batch, cfg, generator)
        logits = head.logits_at(masked, batch["attention_mask"], chosen)
        targets = batch["input_ids"][chosen]
        top = logits.topk(cfg.top_k, dim=-1).indices
        hits1 += int((top[:, 0] == targets).sum())
        hitsk += int((top == targets[:, None]).any(dim=1).sum())
        loss += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        total += int(targets.numel())
    if not total:  # 0.0 would read as a perfect loss
        raise ValueError(
            f"the {len(batches)} held-out batches have no masked position (--mask-prob {cfg.mask_prob} over their "
            "tokens); raise --mask-prob, --batch-size or --eval-batches"
        )
    return {"top1": hits1 / total, f"top{cfg.top_k}": hitsk / total, "loss": loss / total, "positions": total}


def _mask(head: MlmHead, batch: dict[str, torch.Tensor], cfg: MlmHeadConfig, generator: torch.Generator):
    return mask_tokens(
        batch["input_ids"],
        batch["attention_mask"],
        head.special_ids,
        head.tokenizer.mask_token_id,
        len(head.tokenizer),
        cfg.mask_prob,
        generator,
    )


def training_batches(loader, held_out: list[dict], what: str):
    """The training batches of an unshuffled corpus loader whose first ``len(held_out)`` batches are held out,
    one pass after another.

    A corpus loader goes on where the held-out loop left it (it keeps its position) and starts a pass from the
    corpus's beginning only after an end; a pass that starts with the held-out batches skips them. (Skipping
    them at the start of every pass, as before, lost the next ``len(held_out)`` batches of the first one.)

    Raises:
        ValueError: no batch is left after the held-out ones (``what`` names the corpus).
    """
    while True:
        count, skip = 0, 0
        for index, batch in enumerate(loader):
            if index == 0 and torch.equal(batch["input_ids"], held_out[0]["input_ids"]):
                skip = len(held_out)
            if index >= skip:
                count += 1
                yield batch
        if not count:
            raise ValueError(f"{what} has no batches left after the {len(held_out)} held out")


def fit_mlm_head(cfg: MlmHeadConfig, progress: bool = True) -> dict:
    """Fit the head, save the masked-LM to ``cfg.output`` (atomically) and return its figures.

    Raises:
        FileNotFoundError: no encoder directory or corpus manifest.
        ValueError: a corpus tokenised with another tokenizer, or an encoder without a masked-LM class.
    """
    from dist_kd.data.stream import build_corpus_loader
    from dist_kd.io import check_replaceable_dir
    from dist_kd.model_card import saved_model_strangers
    from dist_kd.train.common import progress_bar

    # The output replaces its directory whole: refused before any work unless it is new, empty or an earlier head.
    check_replaceable_dir(
        cfg.output, "--output",
        lambda path: saved_model_strangers(path, [RESULT_FILE]) if (path / RESULT_FILE).is_file()
        else [p.name for p in path.iterdir()],
        f"an earlier masked-LM head (with {RESULT_FILE})", "mlm-head", "an earlier head's directory",
    )  # fmt: skip
    head = MlmHead(cfg.encoder, cfg.seed, cfg.train_layers)
    vocab_size = head.model.config.vocab_size
    if cfg.top_k > vocab_size:  # torch's "selected index k out of range" at the first held-out batch
        raise ValueError(f"top_k (--top-k) {cfg.top_k} exceeds the encoder's vocabulary of {vocab_size} pieces")
    loader = build_corpus_loader(
        cfg.shards, micro_batch_size=cfg.batch_size, num_workers=0, seed=cfg.seed, shuffle=False,
        teacher_tokenizer=head.tokenizer,
    )  # fmt: skip

    held_out = []
    for batch in loader:
        held_out.append(batch)
        if len(held_out) == cfg.eval_batches:
            break
    if len(held_out) < cfg.eval_batches:
        # The whole corpus held out: said after the "before" evaluation, as "no batches left after the N held
        # out", N not the number asked for.
        raise ValueError(
            f"--eval-batches {cfg.eval_batches} holds out the whole corpus {cfg.shards} ({len(held_out)} batches "
            f"of --batch-size {cfg.batch_size}), leaving nothing to train on: give fewer --eval-batches"
        )

    stream = training_batches(loader, held_out, f"corpus {cfg.shards}")
    before = masked_accuracy(head, held_out, cfg, cfg.seed + 1)
    optimizer = torch.optim.AdamW(head.head_parameters, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, round(0.05 * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup)))
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(cfg.steps, 0, "MLM head", progress)
    start = time.perf_counter()
    loss, empty = None, 0
    for _ in range(cfg.steps):
        batch = next(stream)
        masked, chosen = _mask(head, batch, cfg, generator)
        if not chosen.any():  # no position masked (a small batch, a low --mask-prob): a nan loss, nothing to learn
            empty += 1
            bar.update(1)
            continue
        logits = head.logits_at(masked, batch["attention_mask"], chosen)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["input_ids"][chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        # refresh=False: a refreshing postfix draws the bar every step, in a log file one line a step
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update(1)
    bar.close()
    after = masked_accuracy(head, held_out, cfg, cfg.seed + 1)
    if not math.isfinite(after["loss"]):
        raise ValueError(
            f"the head's held-out loss is {after['loss']} after {cfg.steps} steps at --lr {cfg.lr:g}: training "
            f"diverged; lower --lr (nothing was written to {cfg.output})"
        )
    result = {
        "encoder": str(Path(cfg.encoder).resolve()),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 1),
        "last_train_loss": None if loss is None else loss.item(),
        "steps_without_masked_positions": empty,
        "head": "checkpoint" if head.head_from_checkpoint else "fresh",  # the head held_out_before is of
        "held_out_before": before,
        "held_out_after": after,
    }
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(output) as tmp:
        head.save(tmp)
        write_json_atomic(tmp / RESULT_FILE, result)
    return result
