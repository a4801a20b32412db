"""The Python API: the training stages as functions, for notebooks, sweeps and other tools' pipelines.

The two config-driven runs take a config (a YAML path, a dict shaped like the YAML, or the stage's config
object) plus ``key=value`` overrides, exactly as ``dist-kd general`` / ``dist-kd task`` do, and return a
:class:`RunResult`::

    from dist_kd import api

    result = api.general(
        "launch/configs/quickstart.yaml",
        ["teacher.path=models/MiniLM", "data.shards=corpus/news-128", "eval.texts=dev.jsonl", "train.max_steps=50"],
    )
    result.student            # the student as a Hugging Face directory
    result.summary["quality"]  # spread and probe accuracy of teacher, student and a random init

    result = api.task({"student": {"path": str(result.student)}, "tasks": [...]})
    result.eval               # eval.json: dev metrics per task

They run in the calling process (one rank) or, under ``deepspeed`` / ``torchrun`` / SLURM, on every rank of
the job (call them on every rank). Bad input raises ``ValueError`` or ``FileNotFoundError`` with the
message the command line prints; a run stopped by SIGTERM/SIGUSR1 checkpoints and returns
``completed=False`` (call again with the same config to resume).

The other stages are library functions with their own arguments (docs/api.md shows each in use):
:func:`prepare_corpus`, :func:`finetune_teachers`, :func:`augment_task` (or :func:`build_augmenter` for tables
in memory), :func:`precompute_soft_targets`, :func:`export_checkpoint`, :func:`write_report`,
:func:`evaluate_classifier` (``dist-kd evaluate``), :func:`fit_mlm_head` (``dist-kd mlm-head``) and
:func:`compute_metrics`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_kd.data.augment import AugmentConfig, augment_task, build_augmenter
from dist_kd.data.corpus import prepare_corpus
from dist_kd.evaluate import compute_metrics
from dist_kd.export import export_checkpoint
from dist_kd.mlm import MlmHeadConfig, fit_mlm_head
from dist_kd.precompute import PrecomputeConfig, precompute_soft_targets
from dist_kd.predict import evaluate_classifier
from dist_kd.report import write_report
from dist_kd.train.finetune import FinetuneConfig, finetune_teachers

__all__ = [
    "AugmentConfig",
    "FinetuneConfig",
    "MlmHeadConfig",
    "PrecomputeConfig",
    "RunResult",
    "augment_task",
    "build_augmenter",
    "compute_metrics",
    "evaluate_classifier",
    "export_checkpoint",
    "finetune_teachers",
    "fit_mlm_head",
    "general",
    "load_run_config",
    "precompute_soft_targets",
    "prepare_corpus",
    "run_training",
    "task",
    "write_report",
]


@dataclass
class RunResult:
    """What a training run left behind.

    Attributes:
        run_dir: the run directory (config.yaml, metrics.jsonl, checkpoints/, report.md, ...).
        completed: False when a signal stopped the run after a checkpoint (call again to resume).
        lines: the summary the command line prints (main rank; empty on the others and when stopped).
    """

    run_dir: Path
    completed: bool
    lines: list[str] = field(default_factory=list)

    @property
    def student(self) -> Path:
        """The exported student encoder (a Hugging Face directory)."""
        return self.run_dir / "student"

    @property
    def summary(self) -> dict[str, Any] | None:
        """summary.json of a general run (quality table and summary lines), None before the end: also for a run
        stopped by a signal, whose run directory may still hold the summary of an earlier segment that ended
        (a finished run continued with more ``train.max_steps``)."""
        return _read_json(self.run_dir / "summary.json") if self.completed else None

    @property
    def eval(self) -> dict[str, Any] | None:
        """eval.json of a task run (dev metrics per task: latest, best, history), None before the first eval."""
        return _read_json(self.run_dir / "eval.json")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run_config(config_class: type, config: Any, overrides: Sequence[str] = ()) -> Any:
    """A validated ``config_class`` from a YAML path, a dict shaped like the YAML, or an instance, with
    ``overrides`` (``key=value`` strings, or one such string) applied after it.

    Raises:
        ValueError: an unknown key (named with the closest known one) or a bad value.
        FileNotFoundError: the YAML file does not exist.
    """
    from dist_kd.config import config_from_dict, load_config

    if isinstance(overrides, str):  # one override: list() would have split it into characters
        # "a.b=1 c.d=2" set a.b to "1 c.d=2"; a value may hold spaces and "=" ("runs/bs 32 lr=1e-4"), so only a
        # dotted name of one of the config's sections counts as a second pair
        sections = {field.name for field in dataclasses.fields(config_class)}
        names = re.findall(r"\s([A-Za-z_]\w*\.[\w.]+)=", overrides)
        several = [name for name in names if name.split(".")[0] in sections]
        if several:
            raise ValueError(
                f"overrides {overrides!r} is one string holding several key=value pairs ({several[0]}= too); "
                "give a list, one pair each: ['KEY=VALUE', 'KEY=VALUE']"
            )
        overrides = [overrides]
    if isinstance(config, (str, Path)):
        return load_config(config_class, config, list(overrides))
    if isinstance(config, config_class):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise ValueError(
            f"config must be a YAML path, a dict or a {config_class.__name__}, got {type(config).__name__}"
        )
    return config_from_dict(config_class, config, list(overrides))


def run_training(
    cfg: Any, trainer_class: type, finish: Callable[[Any, Any, Any], list[str]], info: Any = None
) -> RunResult:
    """Process group (started if none is running) -> run-directory lock -> trainer -> train -> ``finish``;
    what every training command runs.

    Raises:
        RunDirInUse: another live run writes to the run directory.
        RunDirNotWritable: the run directory cannot be created or written (on every rank).
        ValueError, FileNotFoundError, CheckpointSaveError: bad input or a failed save (nothing written is lost).
        OutputWriteError: another write in the run directory failed (a full or read-only filesystem).
    """
    from dist_kd import distributed
    from dist_kd.io import check_output_outside_data
    from dist_kd.train.checkpoint import CheckpointSaveError, output_write_failed
    from dist_kd.train.common import RunSignals, check_inputs_outside_outputs, check_run_kind, check_run_lock
    from dist_kd.train.runlock import owned_run_dir

    info = info or distributed.init_distributed()
    with distributed.shared_failure():  # before the lock creates the directory: another kind of run in it
        check_run_kind(cfg.run.output_dir, "task" if hasattr(cfg, "tasks") else "general")
        inputs = {f"{key}.path": getattr(getattr(cfg, key, None), "path", None) for key in ("student", "teacher")}
        inputs.update({f"tasks[{t.name}].teacher": t.teacher for t in getattr(cfg, "tasks", [])})
        check_inputs_outside_outputs(cfg.run.output_dir, inputs)
        keys = ("train", "dev", "soft_targets")  # the data a task run fingerprints
        data = {f"tasks[{t.name}].{key}": getattr(t, key) for t in getattr(cfg, "tasks", []) for key in keys}
        check_output_outside_data(cfg.run.output_dir, "run.output_dir", data)
    expected = (ValueError, FileNotFoundError, CheckpointSaveError, OSError)
    with owned_run_dir(cfg.run.output_dir, info, expected=expected) as run_log:
        trainer = None
        try:
            with RunSignals():  # preemption during set-up or the export: no death by signal (see RunSignals)
                trainer = trainer_class(cfg, info)
                if run_log is not None:  # the set-up passed its checks: the run writes its log from here on
                    run_log.start()
                if not trainer.train():
                    return RunResult(Path(cfg.run.output_dir), completed=False)
                # finish writes on rank 0 (summary, model card, report): a failure there stops every rank alike.
                with distributed.shared_failure():
                    lines = finish(trainer, cfg, info)
                # A directory moved away during the last save or the export was made again by them: said, not 0.
                check_run_lock()
                return RunResult(Path(cfg.run.output_dir), completed=True, lines=lines)
        except (ValueError, FileNotFoundError, CheckpointSaveError):
            raise
        except Exception as err:  # a full disk while writing config.yaml, metrics, the export or the report
            failed = output_write_failed(Path(cfg.run.output_dir), err)
            if failed is None:
                raise
            raise failed from err
        finally:
            if trainer is not None:
                trainer.close()
    # The process group stays up for the script's next stage (DeepSpeed caches its groups; a new group after a
    # teardown would not match them). The commands tear it down when they exit; in a script, the exit handler
    # init_distributed registers does (distributed._teardown_at_exit).


def general(config: Any, overrides: Sequence[str] = ()) -> RunResult:
    """General distillation (TinyBERT stage 1), as ``dist-kd general --config CONFIG OVERRIDES...``."""
    from dist_kd.train.general import GeneralConfig, GeneralTrainer, finish_general

    return run_training(load_run_config(GeneralConfig, config, overrides), GeneralTrainer, finish_general)


def task(config: Any, overrides: Sequence[str] = ()) -> RunResult:
    """Task distillation (MT-DNN-KD, TinyBERT's task stage), as ``dist-kd task --config CONFIG OVERRIDES...``."""
    from dist_kd.train.task import TaskTrainer, finish_task
    from dist_kd.train.task_config import TaskConfig

    return run_training(load_run_config(TaskConfig, config, overrides), TaskTrainer, finish_task)
