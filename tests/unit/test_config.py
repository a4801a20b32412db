"""YAML + dotted overrides into nested dataclasses, with clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from dist_kd.config import describe, doc, dump_config, load_config, parse_overrides
from dist_kd.objective import DistillConfig


@dataclass
class Inner:
    rate: float = doc("a rate", 0.5)
    name: str = doc("a name", "x")


@dataclass
class Outer:
    steps: int = doc("steps", 10)
    flag: bool = doc("a flag", False)
    path: str | None = doc("optional path", None)
    inner: Inner = doc("nested", default_factory=Inner)
    distill: DistillConfig = doc("real section", default_factory=DistillConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner: {rate: 2}\ndistill: {layer_map: [1, 3], weights: {attn: 0.5}}\n")
    cfg = load_config(Outer, path, ["inner.name=y", "flag=true", "steps=7", "path=/a/b"])
    assert cfg.steps == 7 and cfg.flag is True and cfg.path == "/a/b"
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float) and cfg.inner.name == "y"
    assert cfg.distill.layer_map == [1, 3] and cfg.distill.weights.attn == 0.5 and cfg.distill.weights.embd == 1.0


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Outer, None, ["distill.layer_map=top", "inner.rate=0.25"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(Outer, path) == cfg


def test_unknown_key_names_closest():
    with pytest.raises(ValueError, match=r"unknown config key 'inner.rat'.*'inner.rate'"):
        load_config(Outer, None, ["inner.rat=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'distill.weights.atn'.*'distill.weights.attn'"):
        load_config(Outer, None, ["distill.weights.atn=1"])


@pytest.mark.parametrize(
    "override, key, said",
    [
        # A key of another section was "did you mean" its own section's closest key, close or not (cutoff 0).
        ("train.micro_batch_size=8", "train.micro_batch_size", "did you mean 'data.micro_batch_size'?"),  # was
        ("data.lr=1e-4", "data.lr", "did you mean 'train.lr'?"),  # train.global_batch_size, data.shards,
        ("data.max_steps=3", "data.max_steps", "did you mean 'train.max_steps'?"),  # data.num_workers
        ("train.max_step=3", "train.max_step", "did you mean 'train.max_steps'?"),  # its own section's, as before
        ("trian.lr=1", "trian", "did you mean 'train'?"),
        ("train.learning_rate=1", "train.learning_rate", "python -m dist_kd.config lists every key"),  # was warmup
        # A name held in (or holding) one of its own section's comes before the same name elsewhere.
        ("data.batch_size=8", "data.batch_size", "did you mean 'data.micro_batch_size'?"),  # not eval.batch_size
        ("student.hidden=8", "student.hidden", "did you mean 'student.hidden_size'?"),  # not distill.weights.hidden
        ("train.lr_rate=1", "train.lr_rate", "did you mean 'train.lr'?"),
        # A close name of its own section comes before the same name elsewhere (was distill.attention, a choice).
        ("distill.weights.attention=0.5", "distill.weights.attention", "did you mean 'distill.weights.attn'?"),
        # ... and a close spelling before a short key whose letters the typo holds in order
        ("student.intemrediate_size=8", "student.intemrediate_size", "did you mean 'student.intermediate_size'?"),
        ("train.sede=3", "train.sede", "did you mean 'train.seed'?"),
        ("student.inti=random", "student.inti", "did you mean 'student.init'?"),
        # A section of few keys names them beside a key of another section.
        ("deepspeed.path=x", "deepspeed.path", "did you mean 'teacher.path'? (deepspeed has config)"),
    ],
)
def test_an_unknown_key_is_told_the_same_name_in_another_section_and_no_far_one(override, key, said):
    from dist_kd.train.general import GeneralConfig

    with pytest.raises(ValueError) as err:
        load_config(GeneralConfig, None, [override])
    assert str(err.value) == f"unknown config key '{key}'; {said}"


def test_a_section_given_whole_after_one_of_its_keys_keeps_that_key():
    """`inner.rate=2 inner={name: y}` dropped inner.rate (the section replaced it), which the same section in
    the YAML file does not do."""
    for overrides in (["inner.rate=2", "inner={name: y}"], ["inner={name: y}", "inner.rate=2"]):
        cfg = load_config(Outer, None, overrides)
        assert (cfg.inner.rate, cfg.inner.name) == (2.0, "y"), overrides
    assert load_config(Outer, None, ["inner.rate=2", "inner.rate=3"]).inner.rate == 3.0  # the last of one key


def test_type_and_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        load_config(Outer, None, ["steps=abc"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        load_config(Outer, None, ["steps=0"])
    with pytest.raises(ValueError, match="distill.layer_map must be"):
        load_config(Outer, None, ["distill.layer_map=middle"])
    with pytest.raises(ValueError, match="look like"):
        parse_overrides(["novalue"])
    with pytest.raises(FileNotFoundError):
        load_config(Outer, tmp_path / "missing.yaml")
    # YAML's .nan passed every range check (NaN compares false) and reached torch: "Invalid learning rate: nan"
    for value in (".nan", ".inf", "-.inf", "nan"):
        with pytest.raises(ValueError, match=r"config key 'inner.rate' must be a finite number, got "):
            load_config(Outer, None, [f"inner.rate={value}"])


def test_yaml_booleans_given_for_a_string_say_to_quote_them(tmp_path):
    """YAML 1.1 reads yes/no/on/off unquoted as booleans: the error says so."""
    path = tmp_path / "c.yaml"
    path.write_text("inner: {name: yes}\n")
    with pytest.raises(ValueError, match=r"'inner.name' must be a string, got True; YAML reads yes, .*quote the value"):
        load_config(Outer, path)
    with pytest.raises(ValueError, match=r"must be a string, got \[1\]$"):  # no hint where YAML is not the cause
        load_config(Outer, None, ["inner.name=[1]"])
    assert load_config(Outer, None, ["inner.name='2024-06-01'"]).inner.name == "2024-06-01"


# Text YAML 1.1 types as something else, and what it reads it as.
TYPED_TEXT = {"001": 1, "0755": 493, "12:30": 750, "2024_01_05": 20240105, "1.50": 1.5, "2024-06-01": None}


@pytest.mark.parametrize("text", sorted(TYPED_TEXT))
def test_a_string_key_takes_numbers_and_dates_as_written(text, tmp_path):
    """A run directory `001` (YAML: 1), mode `0755` (493), `12:30` (750, sexagesimal) or `2024_01_05` (20240105)
    is the text, in an override and in a file, at any depth; a number key still reads the number."""
    import yaml

    if TYPED_TEXT[text] is not None:  # the premise: YAML alone changes these (2024-06-01 becomes a date)
        assert yaml.safe_load(text) == TYPED_TEXT[text]
    assert load_config(Outer, None, [f"inner.name={text}", f"path={text}"]).inner.name == text
    path = tmp_path / "c.yaml"
    path.write_text(f"inner: {{name: {text}}}\npath: {text}\ndistill: {{layer_map: [1, 3]}}\n")
    cfg = load_config(Outer, path)
    assert cfg.inner.name == text and cfg.path == text and cfg.distill.layer_map == [1, 3]
    assert load_config(Outer, None, ["inner.rate=0x10", "steps=0x10"]).inner.rate == 16.0  # numbers stay numbers
    assert load_config(Outer, None, ["path=null"]).path is None


def test_a_number_key_reads_leading_zeros_in_decimal_and_refuses_base_60(tmp_path):
    """`train.max_steps=0300` ran 192 steps (YAML 1.1's octal) and `train.seed=1:00` seeded 60 (base 60), without
    a word, while `0900` (no octal) was refused as text."""
    path = tmp_path / "c.yaml"
    for text, steps in (("0300", 300), ("0900", 900), ("+017", 17), ("1_000", 1000), ("'12'", 12), ("0x10", 16)):
        assert load_config(Outer, None, [f"steps={text}"]).steps == steps, text
        path.write_text(f"steps: {text}\n")
        assert load_config(Outer, path).steps == steps, text
    assert load_config(Outer, None, ["inner.rate=0300"]).inner.rate == 300.0
    for override in ("steps=1:00", "inner.rate=1:30.5"):
        with pytest.raises(ValueError, match=r"has '1:[0-9.]+', which YAML reads in base 60 as [0-9.]+; write the"):
            load_config(Outer, None, [override])
    with pytest.raises(ValueError, match=r"'steps' must be an integer, got '١٢'"):  # digits, but not ASCII ones
        load_config(Outer, None, ["steps=١٢"])


@dataclass
class WithPaths:
    output_dir: str = doc("a run directory", "runs/x", path=True)
    shards: str | None = doc("a corpus", None, path=True)
    name: str = doc("not a path", "~x")


def test_a_leading_tilde_in_a_path_key_is_the_home_directory(tmp_path, monkeypatch):
    """`run.output_dir=~/runs/x` reaches the program unexpanded (a shell expands ~ only at a word's start); a path
    key expands it as the shell would, other keys keep it."""
    import os

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(WithPaths, None, ["output_dir=~/runs/x", "shards=~/c", "name=~/n"])
    assert cfg.output_dir == os.path.join(str(tmp_path), "runs/x") and cfg.shards == f"{tmp_path}/c"
    assert cfg.name == "~/n"
    assert load_config(WithPaths, None, ["output_dir=runs/~x"]).output_dir == "runs/~x"
    assert describe(WithPaths)[0] == "output_dir (path, default runs/x): a run directory"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 5\ninner: {rate: 2\n")
    with pytest.raises(ValueError, match=rf"config file {path} line \d+, column \d+ is not valid YAML"):
        load_config(Outer, path, [])


def test_a_value_of_none_of_a_keys_types_says_them_in_words():
    # it said "which is none of typing.Union[str, list[int]]"
    with pytest.raises(ValueError, match=r"'distill.layer_map' has value \[1.5, 2\]; expected a string or a list of "
                                         r"integers$"):  # fmt: skip
        load_config(Outer, None, ["distill.layer_map=[1.5, 2]"])


def test_zero_weights_on_every_layer_term_are_refused_with_the_config():
    # the objective said it at the first step, after the run directory had been written
    from dist_kd.train.general import GeneralConfig
    from dist_kd.train.task_config import TaskDistillConfig

    zero = ["distill.weights.embd=0", "distill.weights.hidden=0", "distill.weights.attn=0"]
    with pytest.raises(ValueError, match=r"every layer-loss weight \(distill.weights.embd, .*\) is 0"):
        load_config(GeneralConfig, None, zero)
    assert load_config(GeneralConfig, None, [*zero, "distill.weights.sentence=1"]).distill.weights.sentence == 1
    weights = {"embd": 0, "hidden": 0, "attn": 0}
    with pytest.raises(ValueError, match=r"every layer-loss weight \(distill.weights.embd, distill.weights.hidden, "
                                         r"distill.weights.attn\) is 0"):  # fmt: skip
        TaskDistillConfig(phase="intermediate", weights=DistillConfig().weights.__class__(**weights))
    TaskDistillConfig(phase="prediction", weights=DistillConfig().weights.__class__(**weights))  # not read there


def test_a_key_given_twice_is_an_error_not_the_last_one_kept(tmp_path):
    # YAML keeps the last: a second `inner:` section dropped the first's settings without a word
    path = tmp_path / "twice.yaml"
    path.write_text("inner:\n  rate: 2\nsteps: 5\ninner:\n  name: x\n")
    with pytest.raises(ValueError, match=rf"{path} line 4, column 1 .*key 'inner' given twice \(first at line 1\)"):
        load_config(Outer, path, [])
    path.write_text("steps: 5\ninner: {rate: 2, rate: 3}\n")
    with pytest.raises(ValueError, match=r"line 2, column \d+ .*key 'rate' given twice \(first at line 2\)"):
        load_config(Outer, path, [])
    path.write_text("steps: 5\ninner: {rate: 2}\n")  # the same names in two mappings are fine
    assert load_config(Outer, path, []).steps == 5


def test_a_config_that_is_not_utf8_or_is_a_directory_is_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("steps: 5\ninner: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"config file {path} is not UTF-8 text .*save it as UTF-8"):
        load_config(Outer, path, [])
    with pytest.raises(ValueError, match=rf"config file {tmp_path} is a directory"):
        load_config(Outer, tmp_path, [])


def test_override_that_is_not_valid_yaml_is_one_error_naming_it():
    """A value YAML cannot parse (an unclosed list, a leading @ or %) is a ValueError naming the override, which
    the commands print as one error line, not a yaml traceback."""
    for item, problem in (("distill.layer_map=[1, 3", "expected ',' or ']'"), ("path=@models/x", "'@'")):
        with pytest.raises(
            ValueError, match=rf"override '{re.escape(item)}': the value is not valid YAML .*{re.escape(problem)}"
        ):
            load_config(Outer, None, [item])
    assert load_config(Outer, None, ["path='@models/x'"]).path == "@models/x"


def test_describe_lists_every_key_with_type_default_and_doc():
    from dist_kd.config import describe
    from dist_kd.train.general import GeneralConfig
    from dist_kd.train.task_config import TaskConfig

    lines = describe(GeneralConfig)
    keys = [line.split(" ", 1)[0] for line in lines]
    assert "train.lr (float, default 5e-05): peak learning rate" in lines
    assert any(line.startswith("distill.layer_map (str | list[int], default uniform): ") for line in lines)
    assert len(keys) == len(set(keys)) and "teacher.path" in keys and "eval.texts" in keys
    # every key the resolved config holds is described, and nothing else
    from dist_kd.config import config_to_dict, load_config

    def dotted(tree, prefix=""):
        for name, value in tree.items():
            if isinstance(value, dict):
                yield from dotted(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    assert set(keys) == set(dotted(config_to_dict(load_config(GeneralConfig, None, []))))
    task_keys = [line.split(" ", 1)[0] for line in describe(TaskConfig)]
    assert "tasks" in task_keys and "tasks[].soft_targets" in task_keys


def test_docs_config_reference_is_current():
    """docs/config.md lists every key of both training configs as the code defines them today."""
    from pathlib import Path

    from dist_kd.config import reference_markdown
    from dist_kd.train.general import GeneralConfig

    generated = reference_markdown()
    assert "- `student.num_layers` (int, default 4)" in generated and "- `tasks[].name`" in generated
    assert generated.count("\n- `") == len(describe(GeneralConfig)) + generated.split("## task")[1].count("\n- `")
    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert docs.read_text() == generated, "docs/config.md is stale: python -m dist_kd.config > docs/config.md"


def test_a_config_of_the_other_command_says_so(tmp_path):
    """A task config given to general said "unknown config key 'tasks'; did you mean 'data'?", and a general run's
    config.yaml given to task "config key 'student.path' must not be null"."""
    from dist_kd.train.general import GeneralConfig
    from dist_kd.train.task_config import TaskConfig

    with pytest.raises(ValueError, match=r"task_example.yaml is a task distillation config .*run it with dist-kd task"):
        load_config(GeneralConfig, "launch/configs/task_example.yaml")
    with pytest.raises(ValueError, match=r"quickstart.yaml is a general distillation config .*with dist-kd general"):
        load_config(TaskConfig, "launch/configs/quickstart.yaml")
    record = tmp_path / "config.yaml"
    record.write_text("task: {name: topic}\nfinetune: {epochs: 1}\n")  # what dist-kd finetune writes
    for cls in (GeneralConfig, TaskConfig):
        with pytest.raises(ValueError, match="is a fine-tuning directory's record of dist-kd finetune's settings"):
            load_config(cls, record)
    load_config(GeneralConfig, "launch/configs/quickstart.yaml")  # each still loads its own


def test_a_run_directorys_config_names_existing_inputs_by_absolute_paths(tmp_path, monkeypatch):
    """dist-kd export reads RUN/config.yaml from wherever it runs: a relative teacher.path then named another
    directory, or none."""
    import os

    import yaml

    from dist_kd.train.task_config import TaskConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "student").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "task.yaml").write_text(
        "student: {path: student}\ntasks: [{name: topic, labels: [a, b], train: train.jsonl, dev: missing.jsonl}]\n"
        "deepspeed: {config: ds_configs/zero0.json}\nrun: {output_dir: runs/x}\n"
    )
    cfg = load_config(TaskConfig, tmp_path / "task.yaml")
    assert yaml.safe_load(dump_config(cfg))["student"]["path"] == "student"  # as given, unless asked
    written = yaml.safe_load(dump_config(cfg, absolute_paths=True))
    assert written["student"]["path"] == os.path.join(tmp_path, "student")
    assert written["tasks"][0]["train"] == os.path.join(tmp_path, "train.jsonl")  # in a list of sections too
    # Names that are not files here stay as written (the shipped JSON resolves from the package).
    assert written["tasks"][0]["dev"] == "missing.jsonl"
    assert written["deepspeed"]["config"] == "ds_configs/zero0.json"
    assert written["run"]["output_dir"] == "runs/x"
    (tmp_path / "written.yaml").write_text(yaml.safe_dump(written))
    assert load_config(TaskConfig, tmp_path / "written.yaml").student.path == str(tmp_path / "student")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": -1.0}, r"^--lr must be a number > 0, got -1.0$"),
        ({"lr": float("nan")}, r"^--lr must be a number > 0, got nan$"),
        ({"warmup_ratio": 2.0}, r"^--warmup-ratio must be in \[0, 1\), got 2.0$"),
        ({"precision": "fp64"}, r"^--precision must be one of \['auto', 'fp32', 'bf16', 'fp16'\], got 'fp64'$"),
        ({"bf16_mode": "x"}, r"^--bf16-mode must be one of"),
        ({"weight_decay": float("nan")}, r"^--weight-decay must be a number >= 0, got nan$"),
        ({"clip": -1.0}, r"^--clip must be >= 0, got -1.0$"),
        ({"deepspeed_config": "nope.json"}, r"^--deepspeed-config nope.json does not exist"),
    ],
)
def test_finetune_settings_are_checked_with_its_flags_before_any_work(setting, message):
    """dist-kd finetune read and encoded the data, wrote config.yaml and began teacher 1 before "train.lr must be
    > 0" (a key it does not have); --lr nan reached torch ("Invalid learning rate: nan")."""
    from dist_kd.train.finetune import FinetuneConfig

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        FinetuneConfig(**setting)
    FinetuneConfig()  # the defaults pass


def test_the_api_takes_one_override_as_a_string():
    # list("train.max_steps=5") split it into characters: "override 't' must look like key.subkey=value"
    from dist_kd.api import load_run_config
    from dist_kd.train.general import GeneralConfig

    assert load_run_config(GeneralConfig, {}, "train.max_steps=5").train.max_steps == 5
    assert load_run_config(GeneralConfig, {}, ["train.max_steps=6"]).train.max_steps == 6
    # Several pairs in one string set the first key to the rest ("runs/x train.epochs=1"), without a word.
    with pytest.raises(ValueError, match=r"one string holding several key=value pairs \(train.max_steps= too\); give"):
        load_run_config(GeneralConfig, {}, "run.output_dir=runs/x train.max_steps=1")
    for value in ("runs/my run", "runs/bs 32 lr=1e-4", "/tmp/a b=c"):  # a value may hold spaces, and "="
        assert load_run_config(GeneralConfig, {}, f"run.output_dir={value}").run.output_dir == value


def test_the_api_names_what_to_pass_for_a_task_given_by_name(tmp_path):
    """A task's name where a TaskSpec belongs failed deep inside: "'str' object has no attribute 'type'"."""
    from dist_kd import api
    from dist_kd.train.finetune import FinetuneConfig

    calls = [
        lambda: api.evaluate_classifier(tmp_path, "sst2", tmp_path / "dev.tsv"),
        lambda: api.precompute_soft_targets("sst2", tmp_path / "d.tsv", tmp_path / "o", api.PrecomputeConfig(["t"])),
        lambda: api.finetune_teachers("sst2", FinetuneConfig()),
        lambda: api.augment_task("sst2", tmp_path / "d.tsv", tmp_path / "o", tmp_path / "g", api.AugmentConfig()),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"spec must be a TaskSpec, got str 'sst2': make one with .*resolve_task"):
            call()
    with pytest.raises(TypeError, match=r"task must be a task's name \(a str\) or None, got True"):
        api.export_checkpoint(tmp_path, tmp_path / "out", task=True)


def test_api_callers_paths_become_the_strings_the_fields_say():
    """fit_mlm_head trained every step, then could not write mlm.json (a PosixPath is no JSON); finetune_teachers
    failed writing config.yaml; a Path in an api.general dict was refused as no string."""
    import dataclasses
    import json
    from pathlib import Path

    import yaml

    from dist_kd.config import config_from_dict
    from dist_kd.mlm import MlmHeadConfig
    from dist_kd.precompute import PrecomputeConfig
    from dist_kd.train.finetune import FinetuneConfig
    from dist_kd.train.general import GeneralConfig

    mlm = MlmHeadConfig(encoder=Path("/m/encoder"), shards=Path("shards"), output=Path("out"))
    assert json.loads(json.dumps(dataclasses.asdict(mlm)))["encoder"] == "/m/encoder"
    finetune = FinetuneConfig(train=Path("/d/train.jsonl"), base=Path("/m/base"))
    assert yaml.safe_load(yaml.safe_dump(dataclasses.asdict(finetune)))["train"] == "/d/train.jsonl"
    precompute = PrecomputeConfig(teachers=[Path("/t/1"), "/t/2"])
    assert precompute.teachers == ["/t/1", "/t/2"]
    general = config_from_dict(GeneralConfig, {"teacher": {"path": Path("/m/teacher")}})
    assert general.teacher.path == "/m/teacher"


def test_an_override_whose_value_yaml_would_cut_at_a_comment_is_refused():
    """`run.output_dir=runs/exp #3` (quoted by the shell) gave runs/exp: the run wrote to another directory."""
    for item in ("path=runs/exp #3", "inner.name=topic #2", "path=#x"):
        with pytest.raises(ValueError, match=rf"override '{re.escape(item)}': YAML reads ' #' and what follows as a "
                           "comment, and would drop it; quote the value"):  # fmt: skip
            load_config(Outer, None, [item])
    cfg = load_config(Outer, None, ["path='runs/exp #3'", "inner.name=a#b", "distill.layer_map=[1, 3]"])
    assert (cfg.path, cfg.inner.name) == ("runs/exp #3", "a#b")


def test_integer_keys_take_whole_numbers_in_exponent_form_and_strings_given_structure_say_to_quote(tmp_path):
    """1e5 (text to YAML 1.1) was refused for an int key while 1.0e+5 and float keys took it."""
    assert [load_config(Outer, None, [f"steps={text}"]).steps for text in ("1e5", "1.0e5", "1.0e+5", "2E3")] == [
        100000, 100000, 100000, 2000]  # fmt: skip
    with pytest.raises(ValueError, match=r"config key 'steps' must be an integer, got '1.5e0'"):
        load_config(Outer, None, ["steps=1.5e0"])
    with pytest.raises(ValueError, match=r"config key 'inner.name' must be a string, got \{'runs/a': 'b'\}; YAML "
                       r"reads ': ' and '\{' as a mapping: quote the value for a string"):  # fmt: skip
        load_config(Outer, None, ["inner.name=runs/a: b"])


def test_a_dotted_key_in_a_file_says_to_nest_it(tmp_path):
    """`train.lr: 1e-4` in a YAML file was "unknown config key 'train.lr'; did you mean 'train.lr'?"."""
    path = tmp_path / "c.yaml"
    path.write_text("inner.rate: 0.1\n")
    with pytest.raises(ValueError, match=r"config key 'inner.rate' is dotted: nest it \(inner: \{rate: ...\}\); "
                       "dotted keys are for key=value overrides"):  # fmt: skip
        load_config(Outer, path)


def test_an_empty_run_directory_is_refused():
    """run.output_dir: "" ran the whole run into the current directory, with exit 0."""
    from dist_kd.train.common import RunConfig

    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"run.output_dir must name a directory, got an empty path"):
            RunConfig(output_dir=empty)
