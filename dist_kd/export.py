"""Any checkpoint to a Hugging Face directory: ``dist-kd export --checkpoint RUN/checkpoints/step-N --output DIR``.

A run exports its student at the end; a checkpoint of a preempted or still running run, or an earlier step
kept for comparison, is only DeepSpeed files. This rebuilds the student's architecture from the run's
``config.yaml`` (as the trainer did), gathers the weights in fp32 (DeepSpeed's own ZeRO-to-fp32 reader for
ZeRO 1-3 at any world size, the one model file for ZeRO-0; the optimizer's master weights where the run
trained in bf16/fp16), and writes the encoder with the tokenizer, a model card and, for a sentence-
transformers teacher, its pooling modules. Projections W_e/W_h and task heads are not part of the encoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch
import yaml

from dist_kd.data.tasks import glue_key
from dist_kd.data.tokenizer import save_tokenizer
from dist_kd.io import atomic_dir, check_replaceable_dir, write_json_atomic
from dist_kd.train.checkpoint import (
    all_damaged,
    damaged_files,
    latest_checkpoint,
    whole_before,
    whole_checkpoints,
)
from dist_kd.train.engine import HALF_DTYPES, takes_weight_decay

logger = logging.getLogger(__name__)


def _classifier_in(directory: Path) -> str | None:
    """What marks ``directory`` as a model with a head (a task run's ``tasks/<name>/`` or ``best/<name>/``, a
    fine-tuned teacher, a masked-LM of ``dist-kd mlm-head``), or None."""
    if (directory / "best.json").is_file():
        return "best.json"
    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return next((f"config.json architectures {name}" for name in architectures if "For" in name), None)


def _check_classifier_output(output: Path, classifier: str | None, task: str) -> None:
    """``--task``'s output may replace an earlier classifier of the same task only: not an encoder export (the
    run's ``student/``), another task's classifier, or ``best/<task>/`` (its best.json and dev predictions)."""
    if not (output / "config.json").is_file():
        return  # new, empty, or not a model at all (check_replaceable_dir decides)
    if classifier is None:
        raise ValueError(f"--output {output} holds an encoder, not a classifier; --task writes a classifier and "
                         "replaces its directory whole: give a directory of its own")  # fmt: skip
    if classifier == "best.json":
        raise ValueError(f"--output {output} holds best.json (a task run's best/<task>/): give a directory of its own")
    if "ForSequenceClassification" not in classifier:
        raise ValueError(f"--output {output} holds a model with another head ({classifier}): give a directory of "
                         "its own")  # fmt: skip
    try:
        recorded = json.loads((output / "task.json").read_text())["task"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is not None and recorded != task:
        raise ValueError(f"--output {output} holds task {recorded!r}'s classifier, not {task!r}'s: give a directory of "
                         "its own")  # fmt: skip


def _run_input(run_dir: Path, key: str, value: str) -> str:
    """``value`` of ``key`` in the run's config.yaml, checked to be a directory (before transformers takes a
    missing one for a hub name)."""
    if not Path(value).is_dir():
        relative = "" if Path(value).is_absolute() else (
            " (a relative path is read from the directory export runs in; run it where the run started, or write "
            "the absolute path into config.yaml)"
        )  # fmt: skip
        raise FileNotFoundError(
            f"{run_dir / 'config.yaml'}: {key} {value} is not a directory{relative}; export rebuilds the student "
            "from it"
        )
    return value


def _student_model(run_dir: Path, config: dict):
    """(an untrained encoder of the run's student architecture, the state-dict prefix, tokenizer dir, source
    dir of sentence modules or None), as the run's trainer built and exported its student."""
    from transformers import AutoConfig, AutoModel

    from dist_kd.config import load_config
    from dist_kd.models.student import build_student

    if "tasks" in config:  # a task run: the shared encoder ("encoder." in phase prediction, "student." before)
        from dist_kd.train.task_config import TaskConfig

        cfg = load_config(TaskConfig, run_dir / "config.yaml")
        _run_input(run_dir, "student.path", cfg.student.path)
        model_config = cfg.student.encoder_config(AutoConfig.from_pretrained(cfg.student.path))
        prefix = "student." if cfg.distill.phase == "intermediate" else "encoder."
        # A random-init student is not the encoder path's pooling was made for (TaskTrainer.export).
        modules = None if cfg.student.init == "random" else cfg.student.path
        return AutoModel.from_config(model_config), prefix, cfg.student.path, modules
    from dist_kd.train.general import GeneralConfig

    cfg = load_config(GeneralConfig, run_dir / "config.yaml")
    teacher_config = AutoConfig.from_pretrained(_run_input(run_dir, "teacher.path", cfg.teacher.path))
    if cfg.student.path:
        _run_input(run_dir, "student.path", cfg.student.path)
    student_cfg = dataclasses.replace(cfg.student, init="random") if not cfg.student.path else cfg.student
    mapping = (
        None if cfg.student.path else cfg.distill.mapping(teacher_config.num_hidden_layers, cfg.student.num_layers)
    )
    return build_student(student_cfg, teacher_config, mapping=mapping), "student.", cfg.teacher.path, cfg.teacher.path


def fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The engine module's weights at ``checkpoint`` in fp32: the optimizer's master weights where the run
    trained in bf16/fp16.

    ZeRO 1-3 go through DeepSpeed's zero_to_fp32 reader, except DeepSpeed's bf16 optimizer's (ZeRO-1 with fp32
    gradient accumulation: :func:`_bf16_optimizer_state_dict`). It does not read ZeRO-0 checkpoints. For those, the
    module's weights are in ``mp_rank_00_model_states.pt``. In half precision that file also holds DeepSpeed's
    fp16 optimizer's ``fp32_groups``, in the order of the engine's parameter groups (decayed, then not).
    """
    if (checkpoint / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file():
        weights = _bf16_optimizer_state_dict(checkpoint)
        if weights is not None:
            return weights
    if any(checkpoint.glob("*optim_states.pt")):
        from dist_kd.distributed import prefer_cpu_accelerator

        prefer_cpu_accelerator()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{checkpoint} holds no DeepSpeed model states ({model_file.name})")
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    module, buffers = saved["module"], set(saved.get("buffer_names") or ())
    parameters = {name: tensor for name, tensor in module.items() if name not in buffers}
    half = any(tensor.dtype in HALF_DTYPES for tensor in parameters.values())
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if half and masters is not None:
        order = [n for n, t in parameters.items() if takes_weight_decay(n, t)]
        order += [n for n, t in parameters.items() if not takes_weight_decay(n, t)]
        flat = [tensor for group in masters for tensor in group]
        shapes = [tuple(parameters[name].shape) for name in order]
        if shapes != [tuple(tensor.shape) for tensor in flat]:
            raise ValueError(f"{model_file}: the optimizer's fp32 weights do not line up with the module's parameters")
        module = dict(module) | dict(zip(order, flat, strict=True))
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in module.items()}


def _bf16_optimizer_state_dict(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of a checkpoint of DeepSpeed's bf16 optimizer (ZeRO-1 with bf16 and fp32 gradient
    accumulation), which zero_to_fp32 does not read; None for another engine's bf16 checkpoint (ZeRO 1-3's own
    optimizer names its files ``bf16_zero_...`` too, and records its ``zero_stage``: zero_to_fp32 reads those).

    Each rank's file holds its slice of every parameter group's flat fp32 buffer; the slices in rank order are
    the buffer, whose parameters lie in ``param_shapes``' order from its start (the padding at its end). Buffers
    come from the module."""
    import math

    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():  # ZeRO-3's model states are per rank
        return None
    # Memory-mapped: for ZeRO 1-2's own optimizer this is only a look at its keys (zero_to_fp32 reads the file)
    first = torch.load(checkpoint / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False, mmap=True)["optimizer_state_dict"]  # fmt: skip
    if "zero_stage" in first:
        return None
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    ranks = int(saved.get("dp_world_size") or 1)
    files = [checkpoint / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(1, ranks)]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{checkpoint} misses {', '.join(missing)} of its {ranks} ranks' optimizer states")
    states = [first, *(torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"] for p in files)]
    slices = [own["single_partition_of_fp32_groups"] for own in states]
    weights: dict[str, torch.Tensor] = {}
    for index, shapes in enumerate(saved["param_shapes"]):
        flat = torch.cat([own[index] for own in slices])
        offset = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            weights[name] = flat[offset : offset + size].view(shape).clone()
            offset += size
        if offset > flat.numel():
            raise ValueError(f"{checkpoint}: the optimizer's fp32 weights do not line up with the module's parameters")
    for name, source in (saved.get("shared_params") or {}).items():
        weights[name] = weights[source]
    module = {name: weights.get(name, tensor) for name, tensor in saved["module"].items()}
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in module.items()}


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint directory ``checkpoint`` names, as an absolute path (the run directory is two levels up,
    also from a relative ``step-N`` given inside ``RUN/checkpoints``); ``RUN/checkpoints/latest``, the file
    holding the newest complete tag that the trainer writes for DeepSpeed's tools, names that tag. A run
    directory, or its ``checkpoints/``, names its newest whole checkpoint (as a resume would take).

    Raises:
        FileNotFoundError: ``latest`` names a checkpoint that is not there; a run directory holds no whole
            checkpoint.
    """
    # abspath, not resolve: a RUN/checkpoints that is a link (to scratch space) must keep RUN as its parent.
    checkpoint = Path(os.path.abspath(checkpoint))
    if not (checkpoint / "meta.json").is_file():
        # RUN (a run directory named "checkpoints" too), else RUN/checkpoints
        steps = next((d for d in (checkpoint / "checkpoints", checkpoint) if (d.parent / "config.yaml").is_file()
                      and d.name == "checkpoints" and d.is_dir()), None)  # fmt: skip
        if steps is not None:
            newest = latest_checkpoint(steps)
            if newest is None:
                damaged = all_damaged(steps)
                if damaged:
                    raise FileNotFoundError(f"{steps}: every checkpoint the run saved is damaged ({damaged})")
                raise FileNotFoundError(
                    f"{steps} holds no whole checkpoint (a step-N directory with meta.json): the run saved none yet"
                )
            logger.info("exporting %s, the newest whole checkpoint of %s", newest.name, steps.parent)
            return newest
    if checkpoint.name == "latest" and checkpoint.is_file():
        try:
            tag = checkpoint.read_text().strip()
        except UnicodeDecodeError:
            raise FileNotFoundError(
                f"{checkpoint} is not a checkpoint's name (it holds bytes that are no text); give the checkpoint "
                f"itself ({checkpoint.parent}/step-N) or the run directory, whose newest whole checkpoint is taken"
            ) from None
        target = checkpoint.parent / tag
        if not tag or not target.is_dir():
            raise FileNotFoundError(f"{checkpoint} names the checkpoint {tag!r}, which is not in {checkpoint.parent}")
        newest = latest_checkpoint(checkpoint.parent)
        if newest is not None and newest.name > target.name:  # a run that could not update `latest` (a full disk)
            logger.warning("%s names %s, but %s is newer and whole; exporting %s as named", checkpoint, tag,
                           newest.name, tag)  # fmt: skip
        return target
    return checkpoint


def _check_not_an_input(output: Path, run_dir: Path, config: dict) -> None:
    """Refuse an ``--output`` that is a model the run reads (its teacher, its starting student): an earlier
    dist_kd export there passes the replaceable check, and the export replaced the model the run came from."""
    target = output.resolve()
    for section in ("teacher", "student"):
        path = ((config or {}).get(section) or {}).get("path")
        if path and Path(path).expanduser().resolve() == target:
            raise ValueError(
                f"--output {output} is {section}.path of the run {run_dir} (the model it "
                f"{'was distilled from' if section == 'teacher' else 'started from'}): the export would replace it; "
                "give another directory"
            )


def export_checkpoint(checkpoint: str | Path, output: str | Path, task: str | None = None) -> Path:
    """Write the encoder of ``checkpoint`` as an HF directory at ``output`` (atomically); with ``task`` (a task
    run's checkpoint), that task's classifier: the shared encoder and the task's head, as the run's
    ``tasks/<task>/`` holds it (with ``task.json``).

    Raises:
        FileNotFoundError: ``checkpoint`` is not a complete checkpoint of a dist_kd run.
        ValueError: the weights do not fit the architecture the run's config describes.
    """
    if task is not None and not isinstance(task, str):
        raise TypeError(f"task must be a task's name (a str) or None, got {task!r}")
    from dist_kd.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from dist_kd.model_card import (
        encoder_load_snippet,
        is_dist_kd_model,
        model_card,
        saved_model_strangers,
        write_model_card,
    )
    from dist_kd.sentence_modules import carry_sentence_modules

    checkpoint = resolve_checkpoint(checkpoint)
    if task is not None:  # a GLUE task's name as its config may spell it (SST-2): the run knows it as sst2
        task = glue_key(task) or task
    classifier = _classifier_in(Path(output))
    if task is not None:
        _check_classifier_output(Path(output), classifier, task)
    elif classifier:  # a dist_kd model too, but not an encoder export: the task head would be lost
        raise ValueError(
            f"--output {output} holds a model with a head ({classifier}), such as a task run's tasks/<name>/ or "
            "best/<name>/; export writes the student encoder and replaces its directory whole, which would lose "
            "the head: give a directory of its own (e.g. --output student-export)"
        )
    # Before any work: the export replaces its directory whole, so one holding anything but an earlier
    # dist_kd model (".", a run or home directory) is refused, not deleted.
    check_replaceable_dir(
        output, "--output",
        lambda path: saved_model_strangers(path) if is_dist_kd_model(path) else [p.name for p in path.iterdir()],
        "an earlier dist_kd model", "student-export", "an earlier dist_kd model (its README.md a dist_kd model card)",
    )  # fmt: skip
    run_dir = checkpoint.parent.parent
    if not checkpoint.exists():  # a typo, or a step that keep_last pruned: not a save cut short
        whole = [path.name for path in whole_checkpoints(checkpoint.parent)]
        listed = f"; the whole checkpoints in {checkpoint.parent}: {', '.join(whole[-5:])}" if whole else ""
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist{listed}")
    if not (checkpoint / "meta.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete dist_kd checkpoint (no meta.json)")
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint {checkpoint} is damaged: meta.json does not parse ({err})") from None
    problem = damaged_files(checkpoint, meta)
    if problem:  # a truncated file was a traceback from torch.load, or an OSError naming no file
        older = [path.name for path in whole_before(checkpoint)]
        advice = f"; export an earlier one ({', '.join(older[-3:])})" if older else ""
        raise ValueError(f"checkpoint {checkpoint} is damaged: {problem}{advice}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'} is missing: {checkpoint} must sit in RUN/checkpoints/")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    _check_not_an_input(Path(output), run_dir, config)
    model, prefix, tokenizer_dir, modules_dir = _student_model(run_dir, config)
    if task is not None:
        model, prefix, head = _with_task_head(model, prefix, run_dir, config, meta, task), "", task
    else:
        head = None
    try:
        state = fp32_state_dict(checkpoint)
    except (RuntimeError, OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        # a damaged file the sizes missed (zeros from a crash: "filename 'storages' not found")
        raise ValueError(f"checkpoint {checkpoint} does not load ({type(err).__name__}: {err})") from None
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if head is not None:  # the shared encoder and this task's head; the other tasks' heads stay behind
        weights = {key: value for key, value in weights.items() if key.startswith(("encoder.", f"heads.{head}."))}
    shapes = model.state_dict()
    wrong = [key for key, value in weights.items() if key in shapes and shapes[key].shape != value.shape]
    if wrong:  # load_state_dict's RuntimeError was a traceback of one "size mismatch" line per weight
        key = wrong[0]
        # The student is built from student.path's config where the run has one, else from the teacher's.
        source = "student.path" if (config.get("student") or {}).get("path") else "teacher.path"
        raise ValueError(
            f"{checkpoint}: the weights do not fit the student the run's config describes ({len(wrong)} of another "
            f"shape, {key} {tuple(weights[key].shape)} in the checkpoint, {tuple(shapes[key].shape)} built): the "
            f"{source} directory changed since the run, or {run_dir / 'config.yaml'} was edited; put the run's model "
            "and config back"
        )
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{checkpoint}: the weights do not fit the student {config.get('student')} "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    recorded = meta.get("tokenizer.sha256")  # checkpoints of earlier releases do not record it
    if recorded and tokenizer_fingerprint(tokenizer)["sha256"] != recorded:
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} (named in {run_dir / 'config.yaml'}) is not the one the run trained "
            f"with (sha256 {recorded[:16]} in {checkpoint / 'meta.json'}): the directory changed since the run; "
            "put the run's model back there, or the export would ship other token ids than the student's"
        )
    output = Path(output)
    if head is not None:
        return _write_classifier(model, head, tokenizer, output, run_dir, checkpoint, meta)
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp, model.config)
        if modules_dir is not None:
            from transformers import AutoConfig

            # AutoConfig reads each family's name for the width (DistilBERT's config.json says dim)
            source_width = AutoConfig.from_pretrained(modules_dir).hidden_size
            carry_sentence_modules(modules_dir, tmp, model.config.hidden_size, source_width)
        facts = {"run": str(run_dir), "checkpoint": f"{checkpoint.name} (step {meta.get('step')})"}
        facts.update({key: json.dumps(value) for key, value in meta.items() if key in ("teacher", "student", "phase")})
        write_model_card(
            tmp,
            model_card(
                "dist_kd student exported from a checkpoint",
                "The encoder as it was at that step.",
                facts,
                None,
                encoder_load_snippet(output),
                "feature-extraction",
            ),  # fmt: skip
        )
    return output


def _with_task_head(encoder, prefix: str, run_dir: Path, config: dict, meta: dict, task: str):
    """The multi-task student of a task run's checkpoint with ``task``'s head alone, as the run built it."""
    from dist_kd.models.heads import MultiTaskStudent

    if "tasks" not in config:
        raise ValueError(f"--task {task}: {run_dir} is a general run; only a task run's checkpoints hold task heads")
    if prefix != "encoder.":
        raise ValueError(f"--task {task}: {run_dir} ran phase intermediate, which trains no task heads")
    recorded = {entry["name"]: entry for entry in meta.get("tasks") or []}
    if task not in recorded:
        raise ValueError(f"--task {task}: the run's tasks are {', '.join(recorded) or 'not recorded'}")
    entry = recorded[task]
    labels = entry["labels"] if entry["type"] == "classification" else None
    head_dropout = (config.get("student") or {}).get("head_dropout")
    return MultiTaskStudent(encoder, {task: (len(labels) if labels else 1, labels)}, dropout=head_dropout)


def _write_classifier(model, task: str, tokenizer, output: Path, run_dir: Path, checkpoint: Path, meta: dict) -> Path:
    """``task``'s classifier of ``model`` (weights loaded) at ``output``, as a task run exports it."""
    from dist_kd.config import load_config
    from dist_kd.model_card import classifier_load_snippet, model_card, write_model_card
    from dist_kd.predict import TASK_RECORD, task_record
    from dist_kd.train.task_config import TaskConfig

    cfg = load_config(TaskConfig, run_dir / "config.yaml")
    entry = next((entry for entry in cfg.tasks if entry.spec().name == task), None)
    if entry is None:  # config.yaml edited since the run
        raise ValueError(f"--task {task}: {run_dir / 'config.yaml'} lists no task {task!r} (its checkpoint does)")
    spec = dataclasses.replace(entry.spec(), labels=model.heads[task].labels or [])
    pairs = (meta.get("tasks.pairs") or {}).get(task)  # None: a checkpoint of an earlier release
    with atomic_dir(output) as tmp:
        model.export_task(task, tmp, tokenizer)
        write_json_atomic(tmp / TASK_RECORD, task_record(spec, pairs, cfg.data.max_length))
        facts = {"run": str(run_dir), "checkpoint": f"{checkpoint.name} (step {meta.get('step')})", "task": task}
        write_model_card(tmp, model_card(
            f"dist_kd classifier for {task} exported from a checkpoint", "The shared encoder and the task's head as "
            "they were at that step.", facts, None, classifier_load_snippet(output, bool(pairs)),
            "text-classification",
        ))  # fmt: skip
    return output


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dist_kd.cli import add_log_level_argument, bad_input, configure_logging

    parser = argparse.ArgumentParser(description="a checkpoint's student encoder as a Hugging Face directory")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="RUN_DIR/checkpoints/step-NNNNNNNN, RUN_DIR/checkpoints/latest, or RUN_DIR or RUN_DIR/checkpoints "
        "(the newest whole checkpoint)",
    )
    parser.add_argument("--output", required=True, help="the HF directory to write")
    parser.add_argument(
        "--task", default=None, help="a task run's task: its classifier (encoder and head) instead of the encoder"
    )
    add_log_level_argument(parser)
    args = parser.parse_args(argv)
    configure_logging(0, level=args.log_level)  # as the other commands: lines formatted, HF bars at a terminal only
    try:
        written = export_checkpoint(args.checkpoint, args.output, args.task)
        loader = "AutoModel" if args.task is None else "AutoModelForSequenceClassification"
        print(f"wrote {written} (load with transformers.{loader})")
    except (OSError, ValueError) as err:  # OSError: an output it cannot write
        return bad_input(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
