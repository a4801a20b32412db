"""Fine-tune the teacher ensemble of MT-DNN-KD: K classifiers from one base encoder, different seeds/dropouts.

Each teacher is an HF ``AutoModelForSequenceClassification`` built on the base directory (a plain encoder
such as all-MiniLM-L6-v2 gets a fresh head sized for the task), trained on the hard labels with its own
DeepSpeed engine (data parallel across ranks), evaluated on the dev set with the task metric, and exported
as a ready-to-use HF directory whose ``id2label`` is the task's label order, which is exactly what
``launch/precompute.py`` checks. Diversity comes from the seed (head init, dropout masks, data order) and
the dropout rate, as in the paper's ensembles.

Output directory::

    OUTPUT/teacher-1 ... teacher-K   HF model + tokenizer + task.json + finetune.json (params, dev metrics)
                                     + dev_logits.npy
    OUTPUT/report.json               every teacher's dev metrics and the ensemble's (mean of softmaxes)
    OUTPUT/config.yaml, metrics.jsonl, train.log (rank 0's log lines, appended by each run)

Teachers are exported atomically, so a restart skips the teachers already finished with the same settings;
a teacher that was not finished trains again from step 0, and its ``metrics.jsonl`` lines from the interrupted
run are dropped first (the finished teachers' lines stay), so the file holds one line per (teacher, step).
``finetune.json`` records the sha256 of the dev data the saved dev logits were computed on (and of the logits
file); a rerun with another ``--dev`` re-scores a reused teacher on it (one forward pass over the dev set)
instead of mixing in logits of the old dev set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_kd import distributed
from dist_kd.cli import ExitOnSignal
from dist_kd.config import doc, paths_as_text
from dist_kd.data.encode import (
    TokenizedRows,
    length_grouped_order,
    pad_id_of,
    pad_rows,
    tokenize_rows,
    uses_token_types,
)
from dist_kd.data.multitask import check_pairs
from dist_kd.data.tasks import TaskSpec, check_task_spec, has_pairs, load_task_examples
from dist_kd.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint
from dist_kd.evaluate import compute_metrics
from dist_kd.io import (
    atomic_dir,
    atomic_path,
    check_output_outside_data,
    data_fingerprint,
    sha256_file,
    weights_sha256,
    within,
    write_json_atomic,
)
from dist_kd.losses import ensemble_probs, hard_label_loss
from dist_kd.models.capture import ATTN_IMPLEMENTATION, register_attention
from dist_kd.models.dropout import install_fast_dropout
from dist_kd.models.fields import set_dropout, set_fp32
from dist_kd.predict import TASK_RECORD, batched_logits, read_task_record, task_record
from dist_kd.train.common import Diverged, check_run_kind, check_run_lock, progress_bar, weights_finite
from dist_kd.train.engine import (
    TrainConfig,
    build_ds_config,
    build_engine,
    exported_weights,
    full_precision_weights,
    release_engine,
    resolve_ds_path,
    resolve_precision,
)
from dist_kd.train.metrics import MetricsLogger
from dist_kd.train.runlock import owned_run_dir

logger = logging.getLogger(__name__)

RESULT_FILE = "finetune.json"
DEV_LOGITS_FILE = "dev_logits.npy"


# The engine's names of finetune's training settings -> its flags.
_FLAG_OF = {
    "lr": "--lr", "warmup_ratio": "--warmup-ratio", "weight_decay": "--weight-decay", "clip": "--clip",
    "precision": "--precision", "bf16_mode": "--bf16-mode", "config": "--deepspeed-config",
}  # fmt: skip


@dataclasses.dataclass
class FinetuneConfig:
    """Where the data and base model are, and how to train the K teachers."""

    train: str = doc("training data (task data formats; labels required)", "")
    dev: str = doc("dev data scored with the task metric", "")
    base: str = doc("HF directory of the base encoder (with tokenizer)", "")
    output: str = doc("output directory (teacher-1..K, report.json)", "runs/teachers")
    num_teachers: int = doc("K, teachers in the ensemble", 3)
    seeds: list[int] | None = doc("one seed per teacher (default 1..K)", None)
    dropouts: list[float] | None = doc("one dropout rate per teacher (default 0.1 each)", None)
    epochs: int = doc("passes over the training data per teacher", 3)
    max_steps: int | None = doc("cap on optimizer steps per teacher (smoke tests)", None)
    lr: float = doc("peak learning rate (linear warmup, then linear decay)", 2e-5)
    warmup_ratio: float = doc("fraction of the steps with linear warmup", 0.1)
    weight_decay: float = doc("decoupled weight decay", 0.01)
    clip: float = doc("gradient-norm clipping (0 disables)", 1.0)
    batch_size: int = doc("micro-batch per rank", 32)
    eval_batch_size: int = doc("sequences per dev forward pass", 128)
    max_length: int = doc("truncate inputs to this many pieces", 128)
    group_by_length: bool = doc("batch rows of similar length together (less padding; still random batches)", True)
    precision: str = doc("auto | fp32 | bf16 | fp16", "auto")
    bf16_mode: str = doc("a bf16 run: auto | autocast | deepspeed (as train.bf16_mode)", "auto")
    deepspeed_config: str = doc("DeepSpeed JSON (ZeRO stage, ...)", "ds_configs/zero0.json")
    log_every: int = doc("optimizer steps between metrics.jsonl lines", 10)

    def __post_init__(self) -> None:
        paths_as_text(self)  # config.yaml holds them
        if self.num_teachers < 1:
            raise ValueError(f"num_teachers (--num-teachers) must be >= 1, got {self.num_teachers}")
        self.seeds = list(self.seeds) if self.seeds else list(range(1, self.num_teachers + 1))
        self.dropouts = list(self.dropouts) if self.dropouts else [0.1] * self.num_teachers
        for name in ("seeds", "dropouts"):
            if len(getattr(self, name)) != self.num_teachers:
                raise ValueError(
                    f"{name}: give one per teacher ({self.num_teachers} for --num-teachers), got {getattr(self, name)}"
                )
        if any(isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 for seed in self.seeds):
            # torch's and numpy's generators take no others: teacher k was refused only when it began to train
            raise ValueError(f"seeds (--seeds) must be whole numbers in 0..2**63-1, got {self.seeds}")
        if any(not 0 <= rate < 1 for rate in self.dropouts):
            raise ValueError(f"dropouts (--dropouts) must lie in [0, 1), got {self.dropouts}")
        first_of: dict[tuple[int, float], int] = {}
        for k, pair in enumerate(zip(self.seeds, self.dropouts, strict=True), 1):
            if pair in first_of:  # the same run twice: one teacher counted twice in the ensemble's average
                raise ValueError(
                    f"teachers {first_of[pair]} and {k} have the same seed and dropout ({pair[0]}, {pair[1]}) and "
                    f"would train the same teacher; give each teacher its own --seeds (got seeds {self.seeds}, "
                    f"dropouts {self.dropouts})"
                )
            first_of[pair] = k
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "log_every"):
            if getattr(self, name) < 1:
                flag = "" if name == "eval_batch_size" else f" (--{name.replace('_', '-')})"  # the API's alone
                raise ValueError(f"{name}{flag} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps (--max-steps) must be >= 1, or None for whole epochs, got {self.max_steps}")
        # The training settings as the engine checks them, before the data is read and config.yaml written (they
        # were checked when teacher 1 began, under the train.* names of the other commands).
        try:
            TrainConfig(lr=self.lr, warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay, clip=self.clip,
                        precision=self.precision, bf16_mode=self.bf16_mode)  # fmt: skip
            resolve_ds_path(self.deepspeed_config)
        except (ValueError, FileNotFoundError) as err:
            # the key that opens the message alone: a path in it (train.zero2.json) stays as given
            flags = re.sub(r"^(?:train|deepspeed)\.(\w+)", lambda m: _FLAG_OF.get(m[1], m[1]), str(err), count=1)
            raise type(err)(flags) from None


@dataclasses.dataclass
class Encoded:
    """Tokenised examples (:class:`TokenizedRows`) and their labels."""

    rows: TokenizedRows
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def encode(tokenizer, table, max_length: int) -> Encoded:
    """Tokenise a ``load_task_examples`` table (pairs and single texts may mix)."""
    rows = tokenize_rows(tokenizer, table.column("text_a").to_pylist(), table.column("text_b").to_pylist(), max_length)
    return Encoded(rows, np.asarray(table.column("label").to_pylist()))


def collate(data: Encoded, rows: np.ndarray, pad_id: int, device: torch.device, task_type: str) -> dict:
    """Right-padded tensors for ``rows`` of ``data``, with their labels, on ``device``."""
    batch = pad_rows(data.rows, rows, pad_id)
    label_dtype = torch.long if task_type == "classification" else torch.float32
    batch["labels"] = torch.as_tensor(data.labels[rows], dtype=label_dtype)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def build_classifier(base: str | Path, spec: TaskSpec, dropout: float):
    """The base encoder with a fresh sequence-classification head carrying the task's label maps."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dist_kd.models.heads import set_head_dropout
    from dist_kd.models.teacher import load_pretrained

    labels = spec.labels if spec.type == "classification" else ["score"]
    config = AutoConfig.from_pretrained(
        base,
        num_labels=spec.num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
        problem_type="single_label_classification" if spec.type == "classification" else "regression",
    )
    # Every encoder dropout under its family's names (ModernBERT's MLP and embedding dropout too); a config
    # with none is refused with the fields it lacks.
    set_dropout(config, dropout)
    set_head_dropout(config, dropout)  # the head's, under its family's names (DeBERTa's pooler too)
    # dist_kd's attention entry (SDPA, or on a CPU in training the explicit path with the cheaper dropout
    # mask) and its dropout modules: the same model, faster to fine-tune on a CPU (models/dropout.py).
    register_attention()
    # fp32 whatever the base is stored in: transformers loads a base saved in fp16 (its config's dtype) as fp16,
    # which the engine would then train in fp16 without master weights, and export as fp16.
    model, loading = load_pretrained(
        AutoModelForSequenceClassification, base, "--base", new_head=True, config=config,
        attn_implementation=ATTN_IMPLEMENTATION, ignore_mismatched_sizes=True, dtype=torch.float32,
    )  # fmt: skip
    set_fp32(model.config)
    _fresh_head(model, loading, base)
    install_fast_dropout(model)
    return model


def _fresh_head(model, loading: dict[str, Any], base: str | Path) -> None:
    """Re-initialise (from the current torch seed) a classification head that came with the base.

    A base that is itself a fine-tuned classifier (another task's teacher) brings its head: one of another size
    is left out of the load (``ignore_mismatched_sizes``), one of the same size would be loaded and carry the
    other task's classes under this task's label names, the same for every teacher. Every teacher gets a fresh
    head instead, as from a headless encoder.
    """
    import torch

    fresh = set(loading["missing_keys"]) | {entry[0] for entry in loading["mismatched_keys"]}
    heads = [(name, child) for name, child in model.named_children() if name != model.base_model_prefix]
    loaded = [f"{name}.{key}" for name, child in heads for key, _ in child.named_parameters()]
    loaded = [key for key in loaded if key not in fresh]
    if not loaded:
        return
    logger.info("base %s brings a classification head (%s); initialising a fresh one", base, ", ".join(loaded))
    with torch.no_grad():
        for _, child in heads:
            for module in child.modules():
                # transformers skips tensors it marked as loaded; these must be initialised again.
                module._is_hf_initialized = False
                for parameter in module.parameters(recurse=False):
                    parameter._is_hf_initialized = False
                model._init_weights(module)


class TeacherTrainer:
    """Trains, evaluates and exports one teacher on its own DeepSpeed engine."""

    def __init__(self, spec: TaskSpec, cfg: FinetuneConfig, info: distributed.DistInfo, tokenizer, index: int):
        self.spec, self.cfg, self.info, self.tokenizer, self.index = spec, cfg, info, tokenizer, index
        self.seed, self.dropout = cfg.seeds[index], cfg.dropouts[index]
        self.pad_id = pad_id_of(tokenizer)
        torch.manual_seed(self.seed)  # head init and dropout masks
        model = build_classifier(cfg.base, spec, self.dropout)
        self.use_token_types = uses_token_types(tokenizer, model.config)
        self.model = model
        self.engine = None

    def _forward(self, batch: dict) -> torch.Tensor:
        extra = {"token_type_ids": batch["token_type_ids"]} if self.use_token_types else {}
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits

    def train(self, data: Encoded, metrics: MetricsLogger) -> dict[str, Any]:
        """Run the optimizer steps; returns ``{"steps", "final_loss"}``."""
        cfg, info = self.cfg, self.info
        num_rows = len(data)
        global_batch = cfg.batch_size * info.world_size
        max_steps = cfg.epochs * math.ceil(num_rows / global_batch)
        max_steps = min(max_steps, cfg.max_steps or max_steps)
        train_cfg = TrainConfig(max_steps=max_steps, lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, clip=cfg.clip,
                                seed=self.seed, weight_decay=cfg.weight_decay, precision=cfg.precision,
                                bf16_mode=cfg.bf16_mode)  # fmt: skip
        precision = self.precision = resolve_precision(cfg.precision, info.device, "--precision", say=False)
        ds_config = build_ds_config(cfg.deepspeed_config, cfg.batch_size, 1, info.world_size, precision, cfg.clip,
                                    cfg.bf16_mode)  # fmt: skip
        self.engine = build_engine(self.model, train_cfg, ds_config)
        step, epoch, since_log, last_loss = 0, 0, 0, math.nan
        loss_sum = torch.zeros((), device=info.device)
        window_began = time.perf_counter()  # each line's samples/s is its window's, as in general and task runs
        bar = progress_bar(max_steps, 0, f"teacher {self.index + 1}/{cfg.num_teachers}", info.is_main)
        while step < max_steps:
            # Same permutation on every rank (seeded by teacher and epoch); each rank takes its slice of every
            # global batch. Wrapping pads the last batch, so all ranks run the same number of steps.
            rng = np.random.default_rng([self.seed, epoch])
            if cfg.group_by_length:
                order = length_grouped_order(data.rows.lengths, global_batch, rng)
            else:
                order = rng.permutation(num_rows)
            order = np.resize(order, math.ceil(num_rows / global_batch) * global_batch)
            for start in range(0, len(order), global_batch):
                if step >= max_steps:
                    break
                rows = order[start + info.rank * cfg.batch_size : start + (info.rank + 1) * cfg.batch_size]
                batch = collate(data, rows, self.pad_id, info.device, self.spec.type)
                loss = hard_label_loss(self._forward(batch), batch["labels"], self.spec.type)
                self.engine.backward(loss)
                step_lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
                self.engine.step()
                step, since_log = step + 1, since_log + 1
                loss_sum += loss.detach().float()
                if step % cfg.log_every == 0 or step == max_steps:
                    # The only host sync of the loop: mean loss over the logged steps and all ranks.
                    last_loss = distributed.all_reduce_mean(loss_sum / since_log).item()
                    elapsed = max(time.perf_counter() - window_began, 1e-9)
                    check_run_lock()  # collective: a run whose directory another run took over writes no more
                    metrics.log(
                        {
                            "teacher": self.index + 1,
                            "step": step,
                            "loss": last_loss,
                            "lr": step_lr,
                            "samples_per_s": since_log * global_batch / elapsed,
                        }
                    )
                    loss_sum.zero_()
                    since_log = 0
                    window_began = time.perf_counter()  # the log's own time is not the next window's
                    bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                    if not math.isfinite(last_loss):  # the same on every rank (all-reduced)
                        self._check_finite(step, f"its loss was {last_loss} in the steps up to step {step}")
                bar.update(1)
            epoch += 1
        bar.close()
        self._check_finite(step, "found before its export")
        return {"steps": step, "final_loss": last_loss}

    def _check_finite(self, step: int, how: str) -> None:
        """Stop before a diverged teacher is exported (its soft targets would be nan); collective. A non-finite
        loss whose weights are finite (fp16's loss scaling skipped the step) trains on. A run whose directory
        another run took over (:func:`check_run_lock`) stops here too."""
        check_run_lock()
        if weights_finite(self.engine.module):
            return
        cfg = self.cfg
        raise Diverged(
            f"teacher {self.index + 1} diverged by step {step}: its weights are no longer finite (nan or inf; {how}). "
            f"It was not exported; the teachers before it were. Run again with {_steadier(cfg, self.precision)} "
            f"into another --output (or delete {Path(cfg.output) / 'teacher-*'}: a teacher trained with other "
            "settings is not reused)"
        )

    @torch.no_grad()
    def predict(self, data: Encoded) -> np.ndarray:
        """``(N, C)`` float32 dev logits in row order.

        Every rank scores the whole dev set: under ZeRO-3 each forward is collective, so ranks must run the
        same batches, and dev sets are small next to training. The weights are the fp32 ones the export writes,
        not a bf16/fp16 engine's rounded copy (:func:`dist_kd.train.engine.exported_weights`): the
        saved dev logits and results are the exported teacher's.
        """
        module = self.engine.module
        module.eval()
        try:
            with exported_weights(self.engine, module) as scoring:
                return batched_logits(lambda batch: scoring(**batch).logits, data.rows, self.pad_id,
                                      self.cfg.eval_batch_size, self.info.device, self.use_token_types)  # fmt: skip
        finally:
            module.train()

    def export(self, target: Path, result: dict[str, Any], dev_logits: np.ndarray, record: dict[str, Any]) -> None:
        """Save the HF classifier + tokenizer + its task record + results to ``target`` atomically (collective)."""
        module = self.engine.module
        with full_precision_weights(self.engine, module):
            if self.info.is_main:
                with atomic_dir(target) as tmp:
                    module.save_pretrained(tmp)
                    save_tokenizer(self.tokenizer, tmp, module.config)
                    write_json_atomic(tmp / TASK_RECORD, record, indent=2)
                    # A rerun reuses the teacher only while its weights are these (_reusable).
                    _write_dev_results(tmp, {**result, "weights_sha256": weights_sha256(tmp)}, dev_logits)
        distributed.barrier()

    def close(self) -> None:
        """Free the engine (the next teacher builds its own)."""
        if self.engine is not None:
            release_engine(self.engine)
        self.engine = None
        self.model = None


def _steadier(cfg: FinetuneConfig, precision: str) -> str:
    """The settings that steady a diverging teacher, those this run (at ``precision``) can still change."""
    ways = [f"a lower --lr (this run: {cfg.lr:g})"]
    if cfg.clip <= 0:
        ways.append("gradient clipping (--clip 1.0; off in this run)")
    if precision != "fp32":
        ways.append(f"--precision fp32 (this run: {precision})")
    return ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def _differing(params: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """The settings in which ``params`` and an exported teacher's ``saved`` ones differ, a task's by field
    (``task.labels``). The headline metric is not one: it picks a figure of the dev metrics, which hold them all;
    nor is the id column, which training never reads."""
    differ = []
    for key in sorted({*params, *saved}):
        mine, theirs = params.get(key), saved.get(key)
        if key == "task" and isinstance(mine, dict) and isinstance(theirs, dict):
            differ += [f"task.{field}" for field in sorted({*mine, *theirs} - {"metric", "id_column"})
                       if mine.get(field) != theirs.get(field)]  # fmt: skip
        elif key in ("train", "base") and f"{key}_sha256" in params and f"{key}_sha256" in saved:
            continue  # known by its bytes (compared under its own key): the same file or base moved is the same
        elif mine != theirs:
            differ.append(key)
    return differ


def _then_and_now(key: str, params: dict[str, Any], saved: dict[str, Any]) -> str:
    """``KEY: SAVED then, NOW now`` for a setting :func:`_differing` named (digests cut to 12 characters)."""
    mine, theirs = params, saved
    if key.startswith("task."):
        key_in, mine, theirs = key.removeprefix("task."), params.get("task") or {}, saved.get("task") or {}
    else:
        key_in = key

    def shown(value: Any) -> str:
        return repr(value[:12] + "...") if key.endswith("_sha256") and isinstance(value, str) else repr(value)

    return f"{key}: {shown(theirs.get(key_in))} then, {shown(mine.get(key_in))} now"


def teacher_params(spec: TaskSpec, cfg: FinetuneConfig, index: int) -> dict[str, Any]:
    """What determines teacher ``index``; an exported teacher is reused only when these match."""
    return {
        "task": dataclasses.asdict(spec),
        "train": str(Path(cfg.train).resolve()),
        "base": str(Path(cfg.base).resolve()),
        "seed": cfg.seeds[index],
        "dropout": cfg.dropouts[index],
        **{
            name: getattr(cfg, name)
            for name in (
                "epochs",
                "max_steps",
                "lr",
                "warmup_ratio",
                "weight_decay",
                "clip",
                "batch_size",
                "max_length",
                "group_by_length",
                "precision",
            )
        },  # fmt: skip
    }


def _dev_metrics(spec: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = logits if spec.type == "classification" else logits[:, 0]
    return compute_metrics(spec.type, spec.metric, predictions, labels, num_classes=spec.num_labels)


def _read_result(target: Path) -> dict[str, Any]:
    """``target``'s ``finetune.json`` (written atomically with the teacher, so damaged only by hand or by a
    failing disk).

    Raises:
        ValueError: it is not JSON or lacks the teacher's settings, naming the file and the way out.
    """
    path = target / RESULT_FILE
    way_out = f"delete {target} to train that teacher again"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged: not JSON ({err}); {way_out}") from None
    wanted = ("params", "steps", "final_loss", "dev")
    missing = [key for key in wanted if not isinstance(result, dict) or key not in result]
    if missing or not isinstance(result["params"], dict):
        raise ValueError(f"{path} is damaged: it lacks a teacher's {', '.join(missing) or 'params'}; {way_out}")
    return result


def _saved_dev_logits(target: Path, previous: dict[str, Any], dev_sha256: str, num_dev: int) -> np.ndarray | None:
    """The exported teacher's dev logits when they were computed on this dev data, else None (re-score).

    Teachers exported before the dev data was recorded, a logits file that is not the one recorded (a re-score
    interrupted between its two writes) and a row count that differs all count as stale.
    """
    logits_file = target / DEV_LOGITS_FILE
    if previous.get("dev_sha256") != dev_sha256 or not logits_file.is_file():
        return None
    if previous.get("dev_logits_sha256") != sha256_file(logits_file):
        return None
    logits = np.load(logits_file)
    return logits if len(logits) == num_dev else None


@torch.no_grad()
def _rescore(target: Path, cfg: FinetuneConfig, info: distributed.DistInfo, tokenizer, dev: Encoded) -> np.ndarray:
    """Dev logits of the exported teacher in ``target`` (every rank scores; only the exported weights).

    Raises:
        ValueError: the teacher's own tokenizer is not the base's, which tokenised ``dev`` (a base's tokenizer
            replaced in place after a teacher of an earlier release, which did not record it, was exported).
    """
    from transformers import AutoModelForSequenceClassification

    own = tokenizer_fingerprint(load_tokenizer(target))["sha256"]
    if own != tokenizer_fingerprint(tokenizer)["sha256"]:
        raise ValueError(
            f"{target} has another tokenizer than --base {cfg.base}, whose tokenizer reads the dev data here: use "
            "another --output or delete it"
        )
    model = AutoModelForSequenceClassification.from_pretrained(target).to(info.device).eval()
    return batched_logits(lambda batch: model(**batch).logits, dev.rows, pad_id_of(tokenizer), cfg.eval_batch_size,
                          info.device, uses_token_types(tokenizer, model.config))  # fmt: skip


def _write_dev_results(directory: Path, result: dict[str, Any], dev_logits: np.ndarray) -> dict[str, Any]:
    """Write a teacher's dev logits, then ``finetune.json`` with ``result`` and the logits' sha256, each atomically;
    returns what was written.

    The logits go first, so a crash between the two writes leaves a record that does not match the logits file,
    which the next run re-scores (:func:`_saved_dev_logits`).
    """
    with atomic_path(directory / DEV_LOGITS_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, dev_logits)
        result = {**result, "dev_logits_sha256": sha256_file(tmp)}
    write_json_atomic(directory / RESULT_FILE, result, indent=2)
    return result


def _update_dev_results(target: Path, result: dict[str, Any], dev_logits: np.ndarray, info) -> dict[str, Any]:
    """Write re-scored dev logits and metrics into an exported teacher (rank 0; collective barrier)."""
    if info.is_main:
        result = _write_dev_results(target, result, dev_logits)
    distributed.barrier()
    return result


def finetune_teachers(spec: TaskSpec, cfg: FinetuneConfig, info: distributed.DistInfo | None = None) -> dict:
    """Fine-tune, evaluate and export the K teachers; collective across ranks.

    Args:
        spec: the task (labels become each teacher's ``id2label``; ``metric`` scores the dev set).
        cfg: data, base model and training settings.
        info: this rank (default: the process group of :func:`dist_kd.distributed.init_distributed`, started
            from the launcher's environment if none is running, one process without a launcher).

    Returns:
        The report written to ``OUTPUT/report.json``: ``{"task", "task_type", "metric", "label_names", "base",
        "num_train", "num_dev", "teachers": [{"dir", "seed", "dropout", "steps", "final_loss", "dev": {...}}],
        "ensemble_dev": {...}}`` (metric dicts as :func:`dist_kd.evaluate.compute_metrics` returns).

    Raises:
        FileNotFoundError: missing data or base directory.
        ValueError: bad settings (``max_length`` beyond the base's position embeddings among them), or an exported
            teacher in ``output`` made with other settings.
    """
    check_task_spec(spec)
    from transformers import AutoConfig

    from dist_kd.models.teacher import check_max_length, check_model_dir

    info = info or distributed.init_distributed()  # DeepSpeed's engines need a process group
    output = Path(cfg.output)
    # Every rank reads the inputs; a refusal on any rank (a file missing on one node) stops every rank here.
    with distributed.shared_failure():
        check_run_kind(output, "finetune", "--output")
        check_model_dir(cfg.base, "base")
        if within(cfg.base, output):  # teacher-1 would replace its own base
            raise ValueError(
                f"base {cfg.base} is inside --output {cfg.output}, whose teacher-N directories the run replaces "
                "(and every teacher is built from the base): give a base outside it, or another --output"
            )
        check_output_outside_data(output, "--output", {"--train": cfg.train, "--dev": cfg.dev})
        resolve_precision(cfg.precision, info.device, "--precision")  # fp16 on a CPU: refused before any write
        # Before any teacher trains: a length beyond the position embeddings would crash the first long batch.
        check_max_length(AutoConfig.from_pretrained(cfg.base), cfg.max_length, cfg.base, "max_length (--max-length)")
        tokenizer = load_tokenizer(cfg.base)
        train_table = load_task_examples(cfg.train, spec)
        dev_table = load_task_examples(cfg.dev, spec)
        check_pairs(spec, cfg.train, train_table, cfg.dev, dev_table)  # pairs trained, first texts scored otherwise
        pairs = has_pairs(train_table)
        train = encode(tokenizer, train_table, cfg.max_length)
        dev = encode(tokenizer, dev_table, cfg.max_length)
        digests = None
        if info.is_main:  # every byte of the base and the data: read once, by rank 0, and told to the others
            digests = data_fingerprint(cfg.dev), data_fingerprint(cfg.train), weights_sha256(cfg.base)
    digests = distributed.broadcast_object(digests)
    # One run writes the directory (another, or a requeued twin still alive, is refused), and rank 0's log
    # lines go to its train.log from here on.
    expected = (ValueError, FileNotFoundError, OSError, SystemExit)
    stopping = "stopping now (a teacher not yet exported trains again from step 0 on the next run)"
    with owned_run_dir(output, info, "--output", expected=expected) as run_log, ExitOnSignal(stopping):
        # Every exported teacher's settings before anything is written: a rerun refused at teacher 3 had
        # config.yaml rewritten with settings no teacher was trained with (and teachers 1-2 re-scored).
        tokenizer_sha256 = tokenizer_fingerprint(tokenizer)["sha256"]  # read once, not once per teacher
        params = [_params(spec, cfg, info, tokenizer_sha256, digests, index) for index in range(cfg.num_teachers)]
        with distributed.shared_failure():  # the same refusal on every rank: said once
            previous = [_reusable(output / f"teacher-{index + 1}", params[index], info.is_main)
                        for index in range(cfg.num_teachers)]  # fmt: skip
            if info.is_main:
                with atomic_path(output / "config.yaml") as tmp:
                    tmp.write_text(_config_yaml(spec, cfg))
        if run_log is not None:
            run_log.start()
        # Each teacher's task.json, as a task run's classifiers have: dist-kd evaluate takes its text columns and
        # length from it (it scored a teacher trained at --max-length 16 at 128).
        record = task_record(spec, pairs, cfg.max_length)
        return _train_teachers(spec, cfg, info, tokenizer, train, dev, digests, record, params, previous)


def _params(
    spec: TaskSpec, cfg: FinetuneConfig, info, tokenizer_sha256: str, digests: tuple[str, str, str], index: int
):
    """What determines teacher ``index`` in this run: its settings, the training data's and base's bytes (the
    same path with edited data, fixed labels, must train again; so must a base replaced in place), the world
    size (the global batch and steps follow it) and the tokenizer."""
    _, train_sha256, base_sha256 = digests
    return {
        **teacher_params(spec, cfg, index), "train_sha256": train_sha256, "base_sha256": base_sha256,
        "world_size": info.world_size, "tokenizer_sha256": tokenizer_sha256,
    }  # fmt: skip


def _reusable(target: Path, params: dict[str, Any], check_weights: bool = True) -> dict[str, Any] | None:
    """The exported teacher at ``target``'s results when it was trained with ``params`` (None when there is
    none); raise when it was trained with other settings, or (``check_weights``: rank 0, which wrote them, reads
    them once for every rank) holds other weights than it recorded."""
    if target.is_dir() and not (target / RESULT_FILE).is_file() and any(target.iterdir()):
        # Every teacher this command exports holds its finetune.json (written in place whole): this one was
        # made otherwise, and the export would replace it, with whatever else it holds.
        raise ValueError(
            f"{target} exists and holds no {RESULT_FILE}: it is not a teacher this command exported, and training "
            "would replace it whole; move it away, or give another --output"
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, where the teacher's directory goes: move it, or give another --output")
    previous = _read_result(target) if (target / RESULT_FILE).is_file() else None
    if previous is None:
        return None
    params = dict(params)
    for key in ("train_sha256", "base_sha256", "world_size", "tokenizer_sha256"):
        if key not in previous["params"]:  # exported before it was recorded
            params.pop(key)
    differ = _differing(params, previous["params"])
    if differ:
        details = "; ".join(_then_and_now(key, params, previous["params"]) for key in differ)
        if "train_sha256" in differ:  # not a file's sha256: a renamed copy of the same bytes differs too
            details += " (train_sha256 digests the --train data's file names and bytes)"
        raise ValueError(
            f"{target} was trained with other settings ({', '.join(differ)} differ: {details}); use another "
            "--output or delete it"
        )
    if check_weights:
        _check_weights(target, previous)
    return previous


def _check_weights(target: Path, previous: dict[str, Any]) -> None:
    """Raise unless the weights in ``target`` are those its finetune.json records (teachers exported before it
    recorded them pass): a copy cut short or a failing disk left a teacher that was reused, reported finished,
    and failed to load in precompute."""
    recorded = previous.get("weights_sha256")
    if recorded is None:
        return
    try:
        found = weights_sha256(target)
    except FileNotFoundError:
        found = None
    if found != recorded:
        said = "holds no weights file" if found is None else "holds other weights than its finetune.json records"
        raise ValueError(f"{target} {said} (damaged or replaced since it was exported); delete {target} to train "
                         "that teacher again")  # fmt: skip


def _train_teachers(
    spec: TaskSpec,
    cfg: FinetuneConfig,
    info: distributed.DistInfo,
    tokenizer: Any,
    train: Encoded,
    dev: Encoded,
    digests: tuple[str, str, str],
    record: dict[str, Any],
    all_params: list[dict[str, Any]],
    reusable: list[dict[str, Any] | None],
) -> dict:
    """The K teachers in turn (``reusable[k]``: a finished one with the same settings ``all_params[k]``,
    reused), then the report."""
    output = Path(cfg.output)
    dev_sha256 = digests[0]
    metrics = MetricsLogger(output, enabled=info.is_main)
    entries, all_logits = [], []
    for index in range(cfg.num_teachers):
        target, params, previous = output / f"teacher-{index + 1}", all_params[index], reusable[index]
        if previous is not None:
            logger.info("teacher %d: reusing %s", index + 1, target)
            if info.is_main and read_task_record(target) != record:  # this run's metric or id column: evaluate reads it
                write_json_atomic(target / TASK_RECORD, record, indent=2)
            result, dev_logits = previous, _saved_dev_logits(target, previous, dev_sha256, len(dev))
            if dev_logits is None:
                logger.info("teacher %d: dev data %s differs from the one scored before; re-scoring", index + 1,
                            cfg.dev)  # fmt: skip
                dev_logits = _rescore(target, cfg, info, tokenizer, dev)
                result = {**previous, "dev_sha256": dev_sha256, "dev": _dev_metrics(spec, dev_logits, dev.labels)}
                result = _update_dev_results(target, result, dev_logits, info)
        else:
            logger.info("teacher %d/%d: seed %d, dropout %.2f", index + 1, cfg.num_teachers, cfg.seeds[index],
                        cfg.dropouts[index])  # fmt: skip
            # No checkpoints within a teacher: one that crashed restarts from step 0, so its lines from the
            # crashed run go (those of finished, reused teachers stay) and the file never holds a step twice.
            metrics.keep(lambda record, teacher=index + 1: record.get("teacher") != teacher)
            trainer = TeacherTrainer(spec, cfg, info, tokenizer, index)
            try:
                trained = trainer.train(train, metrics)
                dev_logits = trainer.predict(dev)
                result = {"params": params, **trained, "dev": _dev_metrics(spec, dev_logits, dev.labels),
                          "dev_sha256": dev_sha256}  # fmt: skip
                trainer.export(target, result, dev_logits, record)
            finally:
                trainer.close()
            logger.info("teacher %d dev %s = %.4f", index + 1, spec.metric, result["dev"][spec.metric])
        all_logits.append(dev_logits)
        entries.append(
            {
                "dir": target.name,
                "seed": cfg.seeds[index],
                "dropout": cfg.dropouts[index],
                "steps": result["steps"],
                "final_loss": result["final_loss"],
                "dev": result["dev"],
            }
        )
    metrics.close()
    if spec.type == "classification":
        ensemble = ensemble_probs(torch.from_numpy(np.stack(all_logits))).numpy()
    else:
        ensemble = np.mean(all_logits, axis=0)
    report = {
        "task": spec.name,
        "task_type": spec.type,
        "metric": spec.metric,
        "label_names": list(spec.labels),
        "base": str(Path(cfg.base).resolve()),
        "num_train": len(train),
        "num_dev": len(dev),
        "teachers": entries,
        "ensemble_dev": _dev_metrics(spec, ensemble, dev.labels),
    }
    if info.is_main:
        write_json_atomic(output / "report.json", report)
        beyond = sorted(
            (path.name for path in output.glob("teacher-*") if path.name.removeprefix("teacher-").isdigit()
             and int(path.name.removeprefix("teacher-")) > cfg.num_teachers),
            key=lambda name: int(name.removeprefix("teacher-")),
        )  # fmt: skip
        if beyond:  # an earlier run with more teachers: not this ensemble, though it sits beside it
            logger.warning(
                "%s holds %s from an earlier run with more teachers; this ensemble (report.json) is teacher-1.."
                "teacher-%d: delete them, or do not pass them to precompute",
                output, ", ".join(beyond), cfg.num_teachers,
            )  # fmt: skip
    distributed.barrier()
    return report


def _config_yaml(spec: TaskSpec, cfg: FinetuneConfig) -> str:
    import yaml

    return yaml.safe_dump({"task": dataclasses.asdict(spec), "finetune": dataclasses.asdict(cfg)}, sort_keys=False)
