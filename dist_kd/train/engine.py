"""The DeepSpeed engine around student + projections: config filling, optimizer, schedule.

The JSON files in ``ds_configs/`` hold only what is DeepSpeed's business (ZeRO stage, offload,
communication buckets). Batch size, accumulation, precision and clipping are filled in here from the
run config, so the two can never disagree; a JSON file that sets one of them to a different value is an
error rather than a silent override.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_kd.config import doc
from dist_kd.distributed import RANK_SPECIFIC

logger = logging.getLogger(__name__)

# transformers' schedules that need nothing beyond warmup and total steps.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
OPTIMIZERS = ("adamw", "adamax")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_MODES = ("auto", "autocast", "deepspeed")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainConfig:
    """Optimisation settings."""

    max_steps: int = doc("optimizer steps to run", 1000)
    lr: float = doc("peak learning rate", 5.0e-5)
    warmup_ratio: float = doc("fraction of max_steps with linear warmup (then train.scheduler)", 0.1)
    scheduler: str = doc(
        "lr schedule after the warmup, built by transformers.get_scheduler: " + " | ".join(SCHEDULERS), "linear"
    )
    grad_accum: int = doc("micro-batches accumulated per optimizer step", 1)
    clip: float = doc("gradient-norm clipping threshold (0 disables)", 1.0)
    seed: int = doc("seed for weights, dropout and data order", 42)
    optimizer: str = doc("adamw | adamax", "adamw")
    weight_decay: float = doc("decoupled weight decay (not applied to biases and LayerNorm)", 0.01)
    fused_optimizer: bool = doc(
        "AdamW as torch's fused kernel where it has one (CUDA, CPU); false: the per-tensor loop", True
    )
    precision: str = doc(
        "student precision: auto (bf16/fp16 on GPU, fp32 on CPU) | fp32 | bf16 (GPU or CPU) | fp16 (GPU)", "auto"
    )
    bf16_mode: str = doc(
        "how a bf16 student trains: autocast (fp32 weights, the engine's forward and the loss under "
        "torch.autocast; at ZeRO-0 torch's AdamW steps the weights themselves) | deepspeed (DeepSpeed's bf16 "
        "section: bf16 weights, fp32 master copies in its optimizer) | auto (a resumed run: its checkpoint's "
        "mode; else autocast at ZeRO-0, deepspeed at ZeRO 1-3 or where the JSON enables bf16 itself). fp16 "
        "students always use DeepSpeed's fp16 optimizer and its loss scaling",
        "auto",
    )
    compile: bool = doc(
        "torch.compile the student's encoder and the teacher(s) (nn.Module.compile: in place, so checkpoints and "
        "exports are unchanged); the first steps compile them (a minute or more), new input shapes recompile "
        "(held-out evaluation; the task stage's padded batches); ZeRO 0-2",
        False,
    )
    compile_mode: str = doc(
        "torch.compile's mode under train.compile: default | reduce-overhead (CUDA graphs: each step's kernels "
        "replayed as one launch, for small students whose steps are launch-bound; each new input shape records "
        "another graph, in GPU memory) | max-autotune (also searches kernel configurations: a longer compile) | "
        "max-autotune-no-cudagraphs. The CUDA-graph modes need train.grad_accum 1. On a CPU there are no CUDA "
        "graphs: reduce-overhead compiles as default",
        "default",
    )
    global_batch_size: int | None = doc("optional check: must equal micro_batch_size x world size x grad_accum", None)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0 (numpy's generators take no negative seeds), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # nan passed, for torch's "Invalid learning rate: nan"
            raise ValueError(f"train.lr must be a number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be a number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if not self.clip >= 0:  # nan too
            raise ValueError(f"train.clip must be >= 0, got {self.clip}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.bf16_mode not in BF16_MODES:
            raise ValueError(f"train.bf16_mode must be one of {list(BF16_MODES)}, got {self.bf16_mode!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.compile and self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum > 1:
            # A replay of the compiled backward writes its gradients into graph memory that the next
            # micro-batch's replay overwrites, before .grad has summed them (torch's cudagraph_trees).
            raise ValueError(
                f"train.compile_mode={self.compile_mode} replays CUDA graphs, which overwrite one micro-batch's "
                f"gradients with the next one's before train.grad_accum={self.grad_accum} has summed them; use "
                "train.grad_accum=1 (with a larger data.micro_batch_size) or train.compile_mode=default"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"train.scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")


@dataclass
class DeepSpeedSection:
    """Which DeepSpeed JSON to start from."""

    config: str = doc(
        "DeepSpeed JSON (ZeRO stage, offload); batch and clipping keys are filled in, and fp16/bf16's 'enabled' "
        '(their other settings, e.g. a static fp16 loss_scale, are kept); the "auto" values of a JSON written for '
        "the HF Trainer are filled the same way (in zero_optimization, DeepSpeed's defaults); DeepSpeed reads "
        "the whole JSON before any model loads, so a misspelt key inside a section is an error naming it. ZeRO-0 "
        "(the default), with a bf16 student under autocast, was the fastest on one H200 (docs/performance.md) for "
        "students that fit a GPU; ZeRO 1-3 shard optimizer state for large ones, and ZeRO-2/3 (whose shipped JSONs set "
        "overlap_comm) overlap the gradient reduction with the backward",
        "ds_configs/zero0.json",
        path=True,
    )


def resolve_precision(name: str, device: torch.device, setting: str = "train.precision", say: bool = True) -> str:
    """``auto`` -> bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.

    bf16 on a CPU is allowed when asked for (DeepSpeed's CPU accelerator trains it): it runs the GPU's
    mixed-precision path (``train.bf16_mode``: fp32 weights under torch.autocast, or DeepSpeed's bf16
    optimizer with fp32 masters), and CPUs with AMX or AVX512-BF16 run its matrix products faster than fp32.
    fp16 needs a GPU. ``setting``: how the user names it (finetune's ``--precision``), in the messages;
    ``say``: warn about an emulated bf16 (once per run, not per call)."""
    if name != "auto":
        given = f"{setting}={name}" if "." in setting else f"{setting} {name}"  # a config key, or a flag
        if device.type == "cpu" and name == "fp16":
            raise ValueError(f"{given} needs a GPU; use fp32, auto or bf16 on a CPU")
        if device.type == "cpu" and name == "bf16" and not cpu_has_bf16() and say:
            logger.warning(
                "%s: this CPU has no AMX or AVX512-BF16, so its bf16 matrix products are emulated (usually slower "
                "than fp32)", given,
            )  # fmt: skip
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16, from /proc/cpuinfo's flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def resolve_ds_path(path: str) -> Path:
    """A DeepSpeed JSON path as given, or relative to the dist_kd checkout, or one shipped in the package."""
    from dist_kd.config import shipped_file

    candidate = Path(path)
    if not candidate.is_file() and not candidate.is_absolute():
        candidate = REPO_ROOT / path if (REPO_ROOT / path).is_file() else shipped_file(path)
    if not candidate.is_file():
        # Named as they resolve from anywhere: an installed package has no ds_configs/ folder in the working one.
        folder = shipped_file("ds_configs/zero0.json").parent
        shipped = sorted(f"ds_configs/{item.name}" for item in folder.glob("*.json"))
        raise FileNotFoundError(
            f"deepspeed.config {path} does not exist; the shipped ones are {', '.join(shipped)}, or give a path"
        )
    return candidate


# Top-level DeepSpeed sections defined outside deepspeed.runtime.constants (whose string constants give the rest).
_DS_SECTIONS = (
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "autotuning", "elasticity", "compression_training", "data_efficiency", "aio",
    "checkpoint", "nebula", "pipeline", "weight_quantization", "hybrid_engine", "compile", "timers",
)  # fmt: skip


# DeepSpeed settings that change how checkpoints are written or read, which dist_kd's resume does not follow:
# (section, key or None for the whole section, why). Each trained and saved, and then every resume failed (or
# read a checkpoint marked whole that had no model files).
_DS_UNSUPPORTED = (
    ("checkpoint", "writer", "another checkpoint writer (FastPersist, decoupled, ...): dist_kd marks a checkpoint "
     "whole when DeepSpeed's save returns (a decoupled one has not written it yet) and resumes with DeepSpeed's "
     "default loader, which refuses the files those write"),
    ("checkpoint", "load_universal", "dist_kd resumes its own checkpoints, at the world size and ZeRO stage that "
     "wrote them (a universal load fails on them)"),
    ("zero_optimization", "elastic_checkpoint", "its resume needs DeepSpeed's own optimizers (dist_kd's torch AdamW "
     "fails there); dist_kd resumes at the world size that wrote the checkpoint"),
    ("nebula", "enabled", "DeepSpeed no longer has the Nebula checkpoint service"),
    ("datastates_ckpt", None, "another checkpoint engine: dist_kd writes and resumes with DeepSpeed's default one"),
)  # fmt: skip


def _check_unsupported_ds_keys(ds_config: dict[str, Any], source: Path) -> None:
    """Refuse the settings of ``_DS_UNSUPPORTED`` (a false or null value is the default, and taken)."""
    for section, key, why in _DS_UNSUPPORTED:
        value = ds_config.get(section)
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        if value not in (None, False):
            name = f"{section}.{key}" if key else section
            raise ValueError(f"deepspeed.config {source}: {name} is not supported ({why}); remove it")
    # A disabled Nebula section is a no-op that DeepSpeed 0.19+ refuses all the same (it dropped the service):
    # a JSON of an older release keeps working.
    ds_config.pop("nebula", None)


def _check_ds_keys(ds_config: dict[str, Any], source: Path) -> None:
    """Refuse a top-level key that is a misspelling of one DeepSpeed reads: DeepSpeed ignores keys it does not
    know, so ``zero_optimisation: {stage: 2}`` ran at ZeRO-0 without a word. A key close to none is left alone
    (a section of a DeepSpeed release newer than these lists). ``zero_optimization.stage`` must be 0-3; a wrong
    one was a pydantic error naming no file, after the teacher had loaded."""
    import difflib

    import deepspeed.runtime.constants as constants

    known = {value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)}
    known.update(_DS_SECTIONS)
    for key in ds_config:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if close:
            raise ValueError(
                f"deepspeed.config {source} has the key {key!r}, which DeepSpeed does not read (it ignores it "
                f"silently); did you mean {close[0]!r}?"
            )
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    with contextlib.suppress(TypeError, ValueError):  # "2" and 2.0 are stage 2 to DeepSpeed (and to int() here)
        if not isinstance(stage, bool) and float(stage) == int(float(stage)):
            stage = int(float(stage))
    if not isinstance(zero, dict) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        shown = f"stage {stage!r}" if isinstance(zero, dict) else f"{type(zero).__name__}, not an object"
        raise ValueError(f"deepspeed.config {source}: zero_optimization must hold a stage of 0, 1, 2 or 3, got {shown}")
    if "stage" in zero:
        zero["stage"] = stage  # as a number, for every later reading of it
    _check_unsupported_ds_keys(ds_config, source)


def build_ds_config(
    path: str,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    precision: str,
    clip: float,
    bf16_mode: str = "auto",
) -> dict[str, Any]:
    """Load a DeepSpeed JSON and fill in batch, accumulation, precision and clipping.

    A bf16 student with ``bf16_mode="autocast"`` gets DeepSpeed's ``torch_autocast`` section instead of its
    ``bf16`` one: the module stays fp32, the engine's forward runs under ``torch.autocast(bf16)``, and with
    ZeRO-0 the torch optimizer steps the weights directly. DeepSpeed's bf16 section at ZeRO-0 (its unfused
    fp16 optimizer, in bf16) keeps bf16 weights and fp32 masters and, each step, checks every gradient for
    overflow (a host sync per tensor), casts, clips and copies tensor by tensor: a GPU profile put 40 % of a
    general-distillation step there (docs/performance.md). ``"auto"`` is autocast at ZeRO-0 and DeepSpeed's
    bf16 section at ZeRO 1-3, whose optimizers work on flat buffers (and where autocast would reduce the
    embeddings' and LayerNorms' gradients in fp32), or where the JSON enables ``bf16`` itself.

    Raises:
        ValueError: the JSON sets one of those keys to a value that disagrees with the run config.
    """
    source = resolve_ds_path(path)
    try:
        ds_config = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed.config {source} is not valid JSON: {err}") from None
    if not isinstance(ds_config, dict):
        raise ValueError(f"deepspeed.config {source} must hold a JSON object")
    _check_ds_keys(ds_config, source)
    _drop_auto(ds_config)
    owned = [key for key in ("optimizer", "scheduler") if key in ds_config]
    if owned:
        # The engine gets dist_kd's AdamW and schedule (train.lr, train.warmup_ratio, ...); DeepSpeed would
        # otherwise be handed both, and which one trains is not what the user reads in either file.
        raise ValueError(
            f"deepspeed.config {source} sets {' and '.join(repr(k) for k in owned)}, which dist_kd does not use: "
            "the optimizer and schedule come from the train section (train.optimizer, train.lr, train.weight_decay, "
            "train.warmup_ratio, ...); remove the key(s) from the JSON"
        )
    filled: dict[str, tuple[Any, str]] = {  # each key's value, and the run config's key(s) that give it
        "train_micro_batch_size_per_gpu": (micro_batch_size, "data.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum"),
        "train_batch_size": (
            micro_batch_size * grad_accum * world_size,
            "data.micro_batch_size x train.grad_accum x world size",
        ),
        "gradient_clipping": (clip, "train.clip"),
    }
    for key, (value, given_by) in filled.items():
        if key in ds_config and ds_config[key] != value:
            raise ValueError(  # json.dumps: "32", a string, is not the 32 it would print as
                f"deepspeed.config {source} sets {key}={json.dumps(ds_config[key])}, but the run config gives "
                f"{value} ({given_by}); remove the key from the JSON"
            )
        ds_config[key] = value
    for key in ("fp16", "bf16", "bfloat16"):
        if key in ds_config and not isinstance(ds_config[key], dict):
            raise ValueError(
                f'deepspeed.config {source}: {key} must be an object such as {{"enabled": true}}, got '
                f"{json.dumps(ds_config[key])}"
            )
    if "bfloat16" in ds_config:  # DeepSpeed's older name of the bf16 section, read (as here) where bf16 is absent
        older = ds_config.pop("bfloat16")
        if "bf16" not in ds_config:
            ds_config["bf16"] = older
        elif older != ds_config["bf16"]:
            logger.warning("deepspeed.config %s: its 'bfloat16' section is ignored for its 'bf16' one, as DeepSpeed "
                           "does", source)  # fmt: skip
    if "torch_autocast" in ds_config:
        raise ValueError(
            f"deepspeed.config {source} sets 'torch_autocast', which dist_kd sets from train.precision and "
            "train.bf16_mode; remove the key from the JSON"
        )
    json_bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    if bf16_mode == "auto":
        stage = zero_stage(ds_config)
        bf16_mode = "deepspeed" if json_bf16 or stage > 0 else "autocast"
    elif bf16_mode == "autocast" and json_bf16:
        raise ValueError(
            f"deepspeed.config {source} enables bf16 (DeepSpeed's bf16 optimizer), but train.bf16_mode=autocast; "
            "remove the key from the JSON, or set train.bf16_mode=deepspeed"
        )
    autocast = precision == "bf16" and bf16_mode == "autocast"
    for key in ("fp16", "bf16"):
        if ds_config.get(key, {}).get("enabled") and precision != key:
            raise ValueError(f"deepspeed.config {source} enables {key}, but train.precision resolves to {precision}")
        # "enabled" alone is the run config's: the section's other settings (a static loss_scale, the loss
        # scaler's window, bf16's immediate_grad_update) are DeepSpeed's business and stay as the JSON has them.
        ds_config[key] = {**ds_config.get(key, {}), "enabled": precision == key and not autocast}
    if autocast:
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if precision == "fp16":  # dynamic loss scaling from 2^16, unless the JSON says otherwise
        ds_config["fp16"].setdefault("loss_scale", 0)
        ds_config["fp16"].setdefault("initial_scale_power", 16)
    # Offload with a torch optimizer is fine for our small students; DeepSpeed otherwise insists on its own.
    ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
    # ZeRO 1-3 take only the optimizer classes DeepSpeed lists unless told: train.optimizer=adamax (torch's
    # Adamax with decoupled decay, stepped on ZeRO's flat partitions like any torch optimizer) was refused.
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    _check_with_deepspeed(ds_config, source)
    return ds_config


def _drop_auto(ds_config: dict[str, Any]) -> None:
    """Remove the ``"auto"`` values of a JSON written for the Hugging Face Trainer, which fills them in: at the top
    level (the batch keys, ``gradient_clipping``: dist_kd fills them from the run config), in ``fp16`` / ``bf16``
    (``enabled`` comes from ``train.precision``) and in ``zero_optimization`` (DeepSpeed's defaults apply). "auto"
    was read as True ("enables fp16") or refused as a value the run config disagrees with."""
    sections = [ds_config, *(ds_config[key] for key in ("fp16", "bf16", "bfloat16", "zero_optimization")
                             if isinstance(ds_config.get(key), dict))]  # fmt: skip
    for section in sections:
        for key in [key for key, value in section.items() if value == "auto"]:
            del section[key]


def _check_with_deepspeed(ds_config: dict[str, Any], source: Path) -> None:
    """Have DeepSpeed read the config now: a misspelt or mistyped key inside a section
    (``zero_optimization.overlap_comms``) or a section it has dropped (``amp``) was found by
    ``deepspeed.initialize``, after the teacher had loaded and the student been calibrated, as a pydantic
    message naming neither file nor section, or a traceback."""
    import copy

    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    trial = copy.deepcopy(ds_config)
    trial.pop("train_batch_size", None)  # DeepSpeed takes its world size here from a process group there may not be
    try:
        DeepSpeedConfig(trial)
    except (ValueError, DeepSpeedConfigError, AssertionError) as err:
        errors = err.errors() if hasattr(err, "errors") else None  # pydantic's ValidationError
        if not errors:
            raise ValueError(f"deepspeed.config {source}: DeepSpeed refuses it: {err}") from None
        first = errors[0]
        path = tuple(str(part) for part in first["loc"])
        # the section holding the key: the one (object) whose nested keys reach it
        sections = [key for key, value in ds_config.items() if isinstance(value, dict) and _reaches(value, path)]
        where = (
            ".".join((sections[0], *path)) if len(sections) == 1 else f"{'.'.join(path)} (of DeepSpeed's {err.title})"
        )
        if first["type"] == "extra_forbidden":
            what = " is not a setting DeepSpeed knows there (misspelt?)"
        else:
            what = ": " + first["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"deepspeed.config {source}: {where}{what}{more}") from None


def _reaches(section: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Whether ``path`` leads into ``section`` (its last key, the one refused, may be absent: a missing one)."""
    for part in path[:-1]:
        section = section.get(part)
        if not isinstance(section, dict):
            return False
    return bool(path) and (path[-1] in section or len(path) > 1)


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 without a zero_optimization section)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_compile(train: TrainConfig, ds_config: dict[str, Any]) -> None:
    """``train.compile`` with ZeRO-3 is refused: its parameter hooks gather and release weights around every
    submodule's forward. Called with the set-up's checks, before any model loads."""
    if train.compile and zero_stage(ds_config) == 3:
        raise ValueError("train.compile works with ZeRO 0-2; this run's deepspeed.config is ZeRO-3")


def check_batch(micro_batch_size: int, grad_accum: int, world_size: int, global_batch_size: int | None) -> int:
    """The global batch; an explicit ``train.global_batch_size`` must agree."""
    computed = micro_batch_size * grad_accum * world_size
    if global_batch_size is not None and global_batch_size != computed:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} but data.micro_batch_size ({micro_batch_size}) x world size "
            f"({world_size}) x train.grad_accum ({grad_accum}) = {computed}"
        )
    return computed


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and LayerNorm weights are excluded, as in BERT."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if takes_weight_decay(name, parameter) else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def takes_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Whether :func:`parameter_groups` puts the parameter ``name`` in the decayed group (its first)."""
    return parameter.dim() >= 2 and "LayerNorm" not in name and "layer_norm" not in name


class DecoupledAdamax(torch.optim.Adamax):
    """Adamax with decoupled weight decay, as AdamW's: a step first scales each decayed weight that has a gradient
    by ``1 - lr x weight_decay``, then takes Adamax's step without decay.

    torch's Adamax adds the decay to the gradient (L2), where Adamax's update divides it by its own size: a
    weight without a gradient (the student's pooler in general distillation, an idle task head) moved about
    ``lr`` towards 0 at every step, not ``lr x wd x w``.
    """

    @torch.no_grad()
    def step(self, closure=None):
        decays = [group["weight_decay"] for group in self.param_groups]
        for group, decay in zip(self.param_groups, decays):
            if decay:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        parameter.mul_(1.0 - group["lr"] * decay)
            group["weight_decay"] = 0.0
        try:
            return super().step(closure)
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay


def build_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or Adamax (with decoupled weight decay) over the trainable parameters."""
    groups = parameter_groups(module, cfg.weight_decay)
    if cfg.optimizer == "adamax":
        return DecoupledAdamax(groups, lr=cfg.lr)
    fused = fused_kwargs(module) if cfg.fused_optimizer else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, **fused)


def fused_kwargs(module: torch.nn.Module) -> dict[str, bool]:
    """``fused=True`` where torch has a fused AdamW kernel for the parameters (CUDA, and CPU since torch 2.4):
    one kernel over all tensors instead of a dozen elementwise ops per tensor (bench/general.py measures it)."""
    devices = {p.device.type for p in module.parameters()}
    dtypes = {p.dtype for p in module.parameters()}
    supported = devices <= {"cuda", "cpu"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    return {"fused": True} if supported and len(devices) == 1 else {}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' ``get_scheduler(train.scheduler)``: linear warmup over ``ceil(warmup_ratio x max_steps)``
    steps, then the named shape over the rest (linear and cosine reach 0 at ``max_steps``)."""
    from transformers import get_scheduler

    warmup = math.ceil(cfg.max_steps * cfg.warmup_ratio)
    name = built_scheduler(cfg.scheduler, cfg.max_steps, cfg.warmup_ratio)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)


def built_scheduler(scheduler: str, max_steps: int, warmup_ratio: float) -> str:
    """The transformers schedule ``train.scheduler`` builds: ``constant`` with a warmup is
    ``constant_with_warmup`` (transformers' ``constant`` ignores the warmup it is given; until this release a
    constant run took its full rate from step 1, which a checkpoint's record still says)."""
    warmup = math.ceil(max_steps * warmup_ratio)
    return "constant_with_warmup" if scheduler == "constant" and warmup > 0 else scheduler


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates to what ``scheduler`` gives at the step it is at.

    A checkpoint restores the optimizer's learning rates as they were: the rates the schedule it was saved
    under set for the next step. A run resumed with another schedule (a longer ``train.max_steps``, another
    warmup) would take that step at the old schedule's rate, and only the steps after it at the new one's.
    Every ``train.scheduler`` is a ``LambdaLR`` (rate = base rate x multiplier of the step), and the
    multiplier functions are the ones built from this run's config; for an unchanged schedule this sets the
    very values the checkpoint held.
    """
    for group, base, multiplier in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * multiplier(scheduler.last_epoch)


def build_engine(module: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any]):
    """Wrap ``module`` (student + projections) in a DeepSpeed engine with optimizer and schedule.

    Returns:
        The engine (its ``.optimizer`` and ``.lr_scheduler`` are set up and checkpointed by DeepSpeed).
    """
    import deepspeed

    optimizer = build_optimizer(module, cfg)

    # A callable, so the schedule is built on the optimizer DeepSpeed hands back (ZeRO wraps the original).
    def scheduler(wrapped: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return build_scheduler(wrapped, cfg)

    half = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16"))
    start = [p.detach().clone() for p in module.parameters()] if half else []
    # Made before DeepSpeed registers its hooks on the module's tree (exported_weights).
    twin = _storage_free_copy(module) if half and zero_stage(ds_config) == 3 else None
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    engine.dist_kd_scoring_twin = twin
    if half:
        seed_master_weights(engine, start)
        forget_warmup_step(engine.optimizer)
    elif engine.zero_optimization_stage() == 0 and engine.gradient_clipping() > 0 and not engine.has_moe_layers:
        # DeepSpeed clips an fp32 (or autocast) ZeRO-0 engine's gradients one tensor at a time, two kernels
        # each; torch's clip_grad_norm_ takes the norm and scales with its multi-tensor kernels where the
        # device has them (CUDA). The same norm, the same factor min(1, clip / (norm + 1e-6)); at ZeRO-0 the
        # gradients are already averaged over the ranks when the engine clips, so every rank scales alike
        # (DeepSpeed's version also averages the norm over the ranks, for mixture-of-experts layers).
        max_norm = engine.gradient_clipping()
        engine.clip_fp32_gradients = lambda: clip_gradients(engine.module.parameters(), max_norm)
    return engine


def compile_models(models: Iterable[torch.nn.Module], train: TrainConfig, ds_config: dict[str, Any]) -> None:
    """``train.compile``: compile each of ``models`` in place (``nn.Module.compile``: its forward is compiled
    at the first call; parameters, state dict keys and the module tree stay as they are).

    Raises:
        ValueError: ``train.compile`` with ZeRO-3, whose parameter hooks gather and release weights around
            every submodule's forward.
    """
    check_compile(train, ds_config)
    if not train.compile:
        return
    for model in models:
        install_output_hooks(model)
        model.compile(mode=train.compile_mode)
    logger.info(
        "train.compile (mode %s): the student and teacher compile at their first forward passes (a minute or more)",
        train.compile_mode,
    )


def begin_compiled_step(train: TrainConfig) -> None:
    """Tell torch a new training step starts, where ``train.compile_mode`` replays CUDA graphs.

    A CUDA-graph replay writes its outputs into memory that the graph's next replay overwrites; marking each
    step's start tells torch that nothing of the step before (the teacher's features, the student's
    activations, all consumed by its backward, and the gradients, consumed by the optimizer step) is still
    read, so the graphs of one step may reuse that memory instead of torch copying outputs out or recording
    anew. Call it before each step's forward passes. That each step is one micro-batch is TrainConfig's
    rule (no train.grad_accum above 1 in these modes): accumulated gradients would be overwritten. A no-op
    in every other mode.
    """
    if train.compile and train.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def install_output_hooks(model: torch.nn.Module) -> None:
    """Install transformers' output-capturing hooks on every Hugging Face model in ``model`` now, outside any
    compiled region.

    transformers 5 collects hidden states (``output_hidden_states``, which every dist_kd forward asks for)
    through forward hooks it installs at a model's first such call, under a lock. Inside a compiled forward
    that first call broke the graph (at the lock and at each hook's registration: 8 breaks over a teacher
    and a student in the GPU suite's smoke run). Installed beforehand, the first trace is the steady one and
    the graph-break count of a run is a real check. A transformers without this mechanism has nothing to do.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    for module in model.modules():  # outer models first: installing one marks the models inside it as done
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


def autocast_of(engine):
    """The engine's autocast for work outside its forward (the loss and its projections): the
    ``torch.autocast`` its forward runs under, or a no-op for an engine without one."""
    if not engine.torch_autocast_enabled():
        return contextlib.nullcontext()
    from deepspeed.accelerator import get_accelerator

    return torch.autocast(device_type=get_accelerator().device_name(), dtype=engine.torch_autocast_dtype())


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``parameters`` so that their global 2-norm is at most ``max_norm``; return the
    norm before clipping. No host sync: the factor stays on the device."""
    return torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)


def release_engine(engine) -> None:
    """Free ``engine``'s memory for a process that goes on (the teachers of an ensemble one after another,
    the Python API called in a loop). Dropping the last reference is not enough: ZeRO-2 and ZeRO-3
    optimizers register gradient hooks that keep the engine, its module, fp32 masters and optimizer states
    alive until ``engine.destroy()``. ZeRO-3 (DeepSpeed 0.19) also keeps the module on a module-level stack
    that nothing pops (``parameter_offload.FWD_MODULE_STACK``) and, once it has run two steps, in a
    class-level ``lru_cache`` of its parameter coordinator keyed by coordinator and submodule. Both are
    cleared here (the cache only memoizes; another live engine refills it). The engine is unusable
    afterwards."""
    import gc

    try:
        engine.destroy()
    except Exception:  # a clean-up must not hide the error that led here (a CUDA fault, say)
        logger.warning(
            "freeing the DeepSpeed engine failed; its memory may stay in use", exc_info=True, extra=RANK_SPECIFIC
        )
    modules = {id(module) for module in engine.module.modules()}  # a forward that raised left submodules too
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
        if isinstance(stack, list):
            stack[:] = [module for module in stack if id(module) not in modules]
        for function in vars(PartitionedParameterCoordinator).values():
            cells = getattr(function, "__closure__", None) or ()  # DeepSpeed's nvtx wrapper hides the cache
            for candidate in (function, *(cell.cell_contents for cell in cells)):
                if callable(getattr(candidate, "cache_clear", None)):
                    candidate.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()


class EngineTrainer:
    """A trainer that owns a DeepSpeed engine and frees it on every way out.

    ``__init__`` runs the subclass's ``_set_up(cfg, info)``; if that raises after building ``self.engine`` (a
    failed resume check, say), the engine is freed before the error goes on, since no trainer is left for
    anyone to close. ``close`` closes ``self.metrics`` and frees the engine, even when the loggers fail.
    """

    engine: Any = None
    metrics: Any

    def __init__(self, cfg: Any, info: Any):
        self.engine = None
        try:
            self._set_up(cfg, info)
        except BaseException:
            self._release_engine()
            raise

    def _set_up(self, cfg: Any, info: Any) -> None:
        raise NotImplementedError

    def _release_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            release_engine(engine)

    def close(self) -> None:
        """Close the loggers and free the engine (the trainer is done with)."""
        try:
            self.metrics.close()
        finally:
            self._release_engine()


def seed_master_weights(engine, start: list[torch.Tensor]) -> None:
    """Set the optimizer's fp32 master weights to the module's weights as they were before DeepSpeed cast it.

    DeepSpeed casts the module to bf16/fp16 and then copies the masters from the cast module, so a run would
    otherwise start from its initial (say pretrained) weights rounded to half precision. ``start`` holds each
    of ``engine.module``'s parameters before ``deepspeed.initialize``; rank 0's are broadcast first, as
    DeepSpeed broadcasts the module itself.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    parameters = list(engine.module.parameters())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        start = [tensor.to(engine.device) for tensor in start]  # the default group's device (NCCL: the GPU)
        for tensor in start:
            torch.distributed.broadcast(tensor, src=0)
    by_id = _fp16_optimizer_masters(engine.optimizer)
    for parameter, value in zip(parameters, start, strict=True):
        if not parameter.requires_grad or not value.is_floating_point():
            continue
        if id(parameter) in by_id:
            by_id[id(parameter)].data.copy_(value)
        elif hasattr(parameter, "ds_tensor"):
            _set_zero3_master(parameter, value)
        else:
            safe_set_full_fp32_param(parameter, value.to(parameter.device, torch.float32))


def _set_zero3_master(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set this rank's ZeRO-3 partition of ``parameter``'s fp32 master to its slice of ``value``.

    Each rank holds an equal slice of the flattened parameter, the last one padded. DeepSpeed's
    ``safe_set_full_fp32_param`` (0.19) cuts the slice without that padding and fails on any parameter whose
    size is not a multiple of the ranks (a 3-label classifier's bias on 2 ranks), so the slice is cut here."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    size = getattr(parameter.ds_tensor, "ds_numel", parameter.ds_tensor.numel())
    if parameter.ds_tensor.numel() != size:  # swapped out to NVMe (an empty placeholder): DeepSpeed's setter
        safe_set_full_fp32_param(parameter, value.to(torch.float32))
        return
    group = getattr(parameter, "ds_process_group", None)
    rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    local = value.flatten()[size * rank : size * (rank + 1)].to(torch.float32)
    if local.numel() < size:
        local = torch.cat([local, local.new_zeros(size - local.numel())])
    safe_set_local_fp32_param(parameter, local.to(parameter.ds_tensor.device))


def gathered_parameters(engine, parameters: list[torch.nn.Parameter]):
    """A context in which ZeRO-3 partitioned ``parameters`` are whole on every rank (a no-op for stages 0-2).

    Exports read full weights; under ZeRO-3 each rank holds only a shard, so every rank must enter this
    (it is collective) even if only rank 0 writes.
    """
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    return contextlib.nullcontext()


HALF_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def full_precision_weights(engine, module: torch.nn.Module):
    """A context in which ``module``'s parameters are whole and hold the optimizer's fp32 master weights.

    A bf16/fp16 engine with DeepSpeed's half-precision optimizer (fp16, or ``train.bf16_mode=deepspeed``)
    keeps the module in half precision and the exact weights in the optimizer (fp32); the module's copy is
    the master rounded to 8 (bf16) or 11 (fp16) significant bits. Exports run inside this context, so a GPU
    run writes the fp32 weights it trained, as a CPU run does. A parameter with no master (frozen) is written
    as its half value, widened. Collective under ZeRO-3 (every rank must enter); the module is as before on
    exit. A no-op for fp32 engines and autocast ones (whose module holds the fp32 weights).
    """
    parameters = list(module.parameters())
    with gathered_parameters(engine, parameters):
        half = [p for p in parameters if p.dtype in HALF_DTYPES]
        if not half:
            yield module
            return
        masters = master_weights(engine, half)
        kept = [p.data for p in half]
        try:
            for parameter, master in zip(half, masters, strict=True):
                parameter.data = (parameter.data if master is None else master).to(parameter.device, torch.float32)
            yield module
        finally:
            for parameter, data in zip(half, kept, strict=True):
                parameter.data = data


def exported_weights(engine, module: torch.nn.Module):
    """A context for forward passes (dev scores, quality figures) with the weights the exports write; it
    yields the module to run, ``module`` or a twin of it.

    Under ZeRO 0-2 with a half-precision module (DeepSpeed's bf16/fp16 optimizers), that is
    :func:`full_precision_weights`: the scores are those of the exported fp32 model, not of the engine's copy
    rounded to 8 or 11 bits. fp32 and autocast modules already hold those weights (nothing to do). Under ZeRO-3
    the module's forward hooks would partition the weights gathered for the context midway through a pass, so
    a half-precision ZeRO-3 engine is scored on :func:`_scoring_twin`: a plain fp32 copy of ``module`` loaded
    with the master weights (every rank must enter; the forward passes inside are each rank's own).
    """
    if not any(p.dtype in HALF_DTYPES for p in module.parameters()):
        return contextlib.nullcontext(module)
    if engine.zero_optimization_stage() == 3:
        return _scoring_twin(engine, module)
    return full_precision_weights(engine, module)


def _storage_free_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` (tree, ties, dtypes, train/eval modes) whose tensors hold no storage (meta)."""
    import copy

    return copy.deepcopy(module).to("meta")


@contextlib.contextmanager
def _scoring_twin(engine, module: torch.nn.Module):
    """ZeRO-3 in half precision: ``module``'s part of the engine's twin (made by :func:`build_engine` before
    DeepSpeed hooked the module), given storage on the engine's device and the fp32 master weights (and the
    module's buffers) for the context, released after it. No hook of DeepSpeed's is on it, so a forward through
    it gathers nothing and is not collective. The cost: one fp32 copy of ``module`` while the context lasts.
    """
    twin = getattr(engine, "dist_kd_scoring_twin", None)
    if twin is None:
        raise RuntimeError("a ZeRO-3 engine in half precision that build_engine did not make has no scoring twin")
    name = next(name for name, part in engine.module.named_modules() if part is module)
    twin = twin.get_submodule(name)
    twin.to_empty(device=engine.device)
    try:
        with full_precision_weights(engine, module), torch.no_grad():
            sources = dict(module.named_parameters()) | dict(module.named_buffers())
            for key, tensor in [*twin.named_parameters(), *twin.named_buffers()]:
                tensor.copy_(sources[key])
        twin.train(module.training)
        yield twin
    finally:
        twin.to("meta")


def master_weights(engine, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """The optimizer's fp32 copy of each of ``parameters`` (whole), or None where it keeps none.

    ZeRO 1-3 and DeepSpeed's bf16 optimizer map each parameter to its slice of the fp32 partitions
    (``safe_get_full_fp32_param``, collective under ZeRO-3); ZeRO-0 in half precision wraps the torch
    optimizer in DeepSpeed's fp16 optimizer (for bf16 too), whose ``fp32_groups`` (or, fused,
    ``fp32_groups_flat``) parallel its ``fp16_groups``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    by_id = _fp16_optimizer_masters(engine.optimizer)
    out = []
    for parameter in parameters:
        master = by_id.get(id(parameter))
        if master is None and parameter.requires_grad:
            master = safe_get_full_fp32_param(parameter)
        out.append(None if master is None else master.detach())
    return out


def forget_warmup_step(optimizer) -> None:
    """Empty the state of the optimizer inside DeepSpeed's fp16 optimizers (ZeRO-0 in bf16/fp16).

    Their constructors call the wrapped optimizer's ``step()`` once on zero gradients, to create its state:
    AdamW then counted one step before training, and its bias correction stayed one step off for the whole
    run (the first update 0.745 x lr, not lr; the losses of a few steps 2 % off every other precision and
    stage). torch's optimizers (and DeepSpeed's) create their state at their first real step when it is empty.
    """
    if _fp16_optimizer_masters(optimizer):
        optimizer.optimizer.state.clear()


def _fp16_optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master, for DeepSpeed's fp16 optimizers (ZeRO-0 in bf16/fp16); else empty."""
    by_id: dict[int, torch.Tensor] = {}
    for index, group in enumerate(getattr(optimizer, "fp16_groups", None) or []):
        if getattr(optimizer, "fp32_groups", None):
            masters = optimizer.fp32_groups[index]
        elif getattr(optimizer, "fp32_groups_flat", None):
            flat = optimizer.fp32_groups_flat[index]
            masters = [flat.narrow(0, start, p.numel()).view_as(p) for p, start in zip(group, _offsets(group))]
        else:
            break
        by_id.update((id(p), master) for p, master in zip(group, masters, strict=True))
    return by_id


def _offsets(tensors: list[torch.Tensor]) -> list[int]:
    starts, total = [], 0
    for tensor in tensors:
        starts.append(total)
        total += tensor.numel()
    return starts
