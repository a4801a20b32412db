"""Run configuration: nested dataclasses, YAML files and dotted command-line overrides.

Precedence is dataclass defaults <- YAML file <- ``a.b=c`` overrides. Every key is checked against the
dataclass fields: an unknown key is an error naming the closest known one, where one is close (users write
these files by hand, and a typo that silently falls back to a default wastes a cluster job). Field-level validation
lives in each dataclass's ``__post_init__`` and raises ``ValueError`` naming the field and the allowed values.

A value given for a string key is the text as written: YAML would read ``001`` as 1, ``0755`` as 493, ``12:30``
as 750 and ``2024_01_05`` as 20240105, so numbers and dates keep the text they were written as for such keys
(:class:`_Loader`); booleans (``yes``, ``off``) are refused with a hint to quote them. A number key reads
leading zeros in decimal (``0300`` is 300, not octal 192) and refuses base-60 numbers (``1:00``). A ``~`` at
the start of a path-valued key (``doc(..., path=True)``) is the user's home directory, as in a shell.

The stage-specific dataclasses (general distillation, task distillation) are defined by the modules
that use them; this module only knows how to build any of them from a mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def doc(
    text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, path: bool = False
) -> Any:
    """A dataclass field with a one-line description (shown in errors and ``describe``).

    ``path``: the value names a file or directory; a leading ``~`` is expanded to the home directory.
    """
    metadata = {"doc": text, "path": True} if path else {"doc": text}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class _Written:
    """A YAML scalar that YAML typed as a number or a date, with the text it was written as."""

    value: Any
    text: str


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose numbers and dates keep their written text (:class:`_Written`): a string key
    takes the text (YAML 1.1 reads ``001`` as 1, ``12:30`` as 750), any other key the typed value. A key
    given twice in one mapping is an error (YAML keeps the last, so a second ``train:`` section dropped the
    first's settings without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' given twice (first at line {seen[key] + 1}); YAML would keep only "
                        "the last: merge them", key_node.start_mark,
                    )  # fmt: skip
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _keeping_text(construct):
    return lambda loader, node: _Written(construct(loader, node), node.value)


for _tag, _construct in (
    ("int", yaml.constructor.SafeConstructor.construct_yaml_int),
    ("float", yaml.constructor.SafeConstructor.construct_yaml_float),
    ("timestamp", yaml.constructor.SafeConstructor.construct_yaml_timestamp),
):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keeping_text(_construct))


def _plain(value: Any) -> Any:
    """``value`` without :class:`_Written` wrappers, at any depth."""
    if isinstance(value, _Written):
        return value.value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _closest(where: str, section: list[str], others: list[str]) -> str:
    """``"; did you mean 'KEY'?"`` for the unknown key ``where``, or where to find the keys when none is close.

    Names compare without case (``text_A`` is ``text_a`` mistyped, not ``text_b``) and without their section
    (whose shared prefix made any key look close). In order: a key of its own section whose name holds the
    given one or is held by it (``data.batch_size``: ``data.micro_batch_size``; ``train.lr_rate``: ``train.lr``);
    or that one abbreviates (``distill.weights.attention``: ``distill.weights.attn``, not ``distill.attention``);
    the same name in one other section (``train.micro_batch_size``: ``data.micro_batch_size``); a close name in
    its own section, then in another; else the section's keys where they are few.
    """

    def leaf(key: str) -> str:
        return key.rsplit(".", 1)[-1].lower()

    given = leaf(where)
    own = [key for key in section if key != where]
    held = [
        key
        for key in own
        if (min(len(given), len(leaf(key))) >= 2 and (given in leaf(key) or leaf(key) in given))
        or _abbreviates(given, leaf(key))
        or _abbreviates(leaf(key), given)
    ]
    # A close spelling of its own section's beats a short key whose letters a long typo holds (intemrediate_size:
    # intermediate_size, not init; inti: init, not intermediate_size)
    held += [key for key in own if key not in held and difflib.SequenceMatcher(None, given, leaf(key)).ratio() >= 0.75]
    same = [key for key in others if leaf(key) == given]
    if held:
        best = max(held, key=lambda key: difflib.SequenceMatcher(None, given, leaf(key)).ratio())
    elif len(same) == 1:  # `path` is teacher.path and student.path: a name of several sections tells nothing
        best = same[0]
    else:
        best = None
        for pool, cutoff in ((own, 0.6), (others, 0.75)):
            by_leaf = {leaf(key): key for key in reversed(pool)}
            match = difflib.get_close_matches(given, list(by_leaf), n=1, cutoff=cutoff)
            if match:
                best = by_leaf[match[0]]
                break
    parent = where.rsplit(".", 1)[0] if "." in where else None
    keys = f"{f'{parent} has' if parent else 'the sections are'} {', '.join(leaf(key) for key in own)}"
    few = bool(own) and len(own) <= 8  # a section's keys, where they fit in the line
    if best is not None:  # from another section: its own keys too, where few (deepspeed.path: teacher.path, or config)
        return f"; did you mean '{best}'?" + (f" ({keys})" if few and best not in own else "")
    return f"; {keys}" if few else "; python -m dist_kd.config lists every key"


def _abbreviates(short: str, name: str) -> bool:
    """Whether ``short`` (3 letters or more) is ``name`` with letters left out, its first kept (``attn``:
    ``attention``; ``embd``: ``embedding``)."""
    letters = iter(name[1:])
    return 3 <= len(short) < len(name) and short[0] == name[0] and all(char in letters for char in short[1:])


class _UnknownKey(ValueError):
    """A key no field has; :func:`config_from_dict`, which knows the whole config, says the closest one."""

    def __init__(self, where: str, section: list[str]):
        super().__init__(f"unknown config key '{where}'")
        self.where, self.section = where, section


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the config dataclass ``cls`` and of its sections, dotted (not those of list items)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        where = f"{prefix}.{field.name}" if prefix else field.name
        keys.append(where)
        tp, _ = _strip_optional(hints[field.name])
        if dataclasses.is_dataclass(tp):
            keys.extend(_dotted_keys(tp, where))
    return keys


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 - rebuilt from runtime args
    return tp, False


_TYPE_WORDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
               bool: ("true or false", "booleans")}  # fmt: skip


def _type_words(tp: Any) -> str:
    """A type as a message says it: ``list[int]`` is "a list of integers"."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_TYPE_WORDS.get(item, (None, 'values'))[1]}"
    return _TYPE_WORDS.get(tp, (getattr(tp, "__name__", str(tp)),))[0]


def _number_as_written(value: Any, text: str, where: str) -> Any:
    """A number key's value as its text says in decimal: YAML 1.1 reads ``0300`` as octal (192) and ``1:00`` in
    base 60 (60), which silently ran 192 steps for ``train.max_steps=0300``. Leading zeros are decimal here; a
    base-60 number is refused."""
    import re

    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    written = text.strip()
    if ":" in written:
        raise ValueError(
            f"config key '{where}' has {written!r}, which YAML reads in base 60 as {value}; write the number itself"
        )
    if re.fullmatch(r"[-+]?0[0-7_]+", written):  # octal to YAML 1.1 (0900 is no octal: YAML keeps that text)
        return int(written.replace("_", ""))
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ValueError naming the key."""
    written, text = value, None
    if isinstance(value, _Written):
        value, text = value.value, value.text
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ValueError(f"config key '{where}' must not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{where}' must be a mapping, got {_plain(value)!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (typing.Union, types.UnionType):
        # e.g. `str | list[int]`: accept the first alternative that fits.
        for alt in typing.get_args(tp):
            try:
                return _coerce(written, alt, where)
            except ValueError:
                continue
        expected = " or ".join(_type_words(alt) for alt in typing.get_args(tp))
        raise ValueError(f"config key '{where}' has value {_plain(value)!r}; expected {expected}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key '{where}' must be a list, got {_plain(value)!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{where}' must be a mapping, got {_plain(value)!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{where}' must be true or false, got {_plain(value)!r}")
    if tp in (int, float) and text is not None:
        value = _number_as_written(value, text, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        digits = value.strip().lstrip("+-") if isinstance(value, str) else ""
        if digits.isascii() and digits.isdigit():  # 0900, which YAML keeps as text
            return int(value)
        with contextlib.suppress(ValueError, OverflowError):  # 1e5, which YAML 1.1 keeps as text (float keys take it)
            number = float(value) if isinstance(value, str) and value.isascii() else math.nan
            if number.is_integer():
                return int(number)
        raise ValueError(f"config key '{where}' must be an integer, got {_plain(value)!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and not math.isfinite(number):  # YAML's .nan / .inf: range checks pass NaN
            raise ValueError(f"config key '{where}' must be a finite number, got {_plain(value)!r}")
        if number is not None:
            return number
        raise ValueError(f"config key '{where}' must be a number, got {_plain(value)!r}")
    if tp is str:
        if text is not None:
            return text  # as written: YAML's reading of `001` (1) or `12:30` (750) is not what was meant
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, os.PathLike):  # a pathlib.Path in an API caller's dict
            return os.fspath(value)
        hint = ""
        if isinstance(value, bool | datetime.date):  # YAML 1.1 reads yes/no/on/off unquoted as booleans
            hint = "; YAML reads yes, no, on, off as booleans: quote the value"
        elif isinstance(value, dict):  # `runs/a: b` is a mapping to YAML
            hint = "; YAML reads ': ' and '{' as a mapping: quote the value for a string"
        raise ValueError(f"config key '{where}' must be a string, got {_plain(value)!r}{hint}")
    return value


def paths_as_text(instance: Any) -> None:
    """Turn the ``os.PathLike`` values of a config dataclass's fields into ``str`` (an API caller's
    ``pathlib.Path``), so that they write to JSON and YAML as the strings their fields say they are."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if isinstance(value, os.PathLike):
            setattr(instance, field.name, os.fspath(value))
        elif isinstance(value, list) and any(isinstance(item, os.PathLike) for item in value):
            setattr(instance, field.name, [os.fspath(i) if isinstance(i, os.PathLike) else i for i in value])


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        key = _plain(key)
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(key, str) and "." in key and key not in names:  # "train.lr: 1e-4" in a file or dict
            head, _, rest = key.partition(".")
            raise ValueError(
                f"config key '{where}' is dotted: nest it ({head}: {{{rest}: ...}}); dotted keys are for key=value "
                "overrides on the command line"
            )
        if key not in names:
            raise _UnknownKey(where, [f"{prefix}.{n}" if prefix else n for n in names])
        kwargs[key] = _coerce(value, hints[key], where)
        if fields[key].metadata.get("path") and isinstance(kwargs[key], str):
            # A shell expands ~ only at the start of a word: `run.output_dir=~/runs/x` reaches us unexpanded.
            kwargs[key] = os.path.expanduser(kwargs[key])
    try:
        return cls(**kwargs)
    except ValueError as err:
        message = str(err)
        if prefix and not message.startswith(prefix):
            # "lr must be > 0" names a field of this section: "train.lr must be > 0"; any other message
            # ("task 'x': ...") gets the section as a location: "tasks[1]: task 'x': ...".
            names_field = any(message.startswith(f"{name} ") for name in names)
            raise ValueError(f"{prefix}.{message}" if names_field else f"{prefix}: {message}") from None
        raise


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    earlier = node.get(parts[-1])
    # `train.lr=0.5 train={seed: 3}` keeps train.lr, as a section in the YAML file would (merged, not replaced)
    node[parts[-1]] = _merge(earlier, value) if isinstance(value, dict) and isinstance(earlier, dict) else value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=3", "c=[1, 2]"]`` into a nested mapping; values are parsed as YAML scalars/lists (numbers and
    dates as :class:`_Written`, keeping their text for string keys)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key.subkey=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ValueError(f"override '{item}' has an empty key")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"override '{item}': the value is not valid YAML ({problem}); quote it for a string, "
                f"e.g. {key}=\"'{raw}'\" in a shell"
            ) from None
        if re.search(r"(^|\s)#", raw) and "#" not in str(value):  # `run.output_dir=runs/exp #3` gave runs/exp
            raise ValueError(
                f"override '{item}': YAML reads ' #' and what follows as a comment, and would drop it; quote "
                f"the value for a string, e.g. {key}=\"'{raw}'\" in a shell"
            )
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


SHIPPED = {"launch/configs/": "launch/configs", "ds_configs/": "ds_configs", "launch/slurm/": "launch/slurm"}


def shipped_file(path: str | Path) -> Path:
    """``path`` itself when it exists; else, for ``launch/configs/X``, ``ds_configs/X`` and ``launch/slurm/X``,
    the copy shipped with dist_kd (the checkout's, or the installed package's ``dist_kd/launch/configs``,
    ``dist_kd/ds_configs``, ``dist_kd/launch/slurm``).
    """
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    package = Path(__file__).resolve().parent
    for prefix, folder in SHIPPED.items():
        if path.as_posix().startswith(prefix):
            rest = path.as_posix()[len(prefix) :]
            for root in (package.parent / folder, package / folder):  # a checkout, then an installed package
                if (root / rest).exists():
                    return root / rest
    return path


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build a config dataclass from defaults, an optional YAML file and dotted overrides.

    Args:
        cls: the top-level config dataclass.
        path: a YAML file (None for defaults only).
        overrides: ``key.sub=value`` strings, applied after the file.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: an unknown key, a value of the wrong type, or a field's own validation failed.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = shipped_file(path)
        if path.is_dir():
            raise ValueError(f"config file {path} is a directory; give a YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}  # noqa: S506 - a SafeLoader
        except UnicodeDecodeError as err:
            raise ValueError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it "
                             "as UTF-8") from None  # fmt: skip
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path}{where} is not valid YAML: {problem}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        data = loaded
        other_kind = getattr(cls, "other_kind", None)  # a config of another command, named as such
        said = other_kind(data) if other_kind is not None else None
        if said:
            raise ValueError(f"config file {path} {said}")
    return config_from_dict(cls, data, overrides)


def config_from_dict(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None) -> T:
    """Build a config dataclass from a dict shaped like the YAML and dotted overrides (validated as a file is)."""
    try:
        return _build(cls, _merge(data, parse_overrides(list(overrides or []))))
    except _UnknownKey as err:
        others = [key for key in _dotted_keys(cls) if key not in err.section]
        raise ValueError(f"unknown config key '{err.where}'{_closest(err.where, err.section, others)}") from None


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        name = " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    elif typing.get_origin(tp) is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(tp))
        name = f"{typing.get_origin(tp).__name__}[{args}]"
    else:
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return f"{name} | null" if optional else name


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per config key, dotted, with its type, default and doc text (the ``--help`` key reference).

    Examples:
        ``train.lr (float, default 5e-05): peak learning rate``
    """
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        shown = "null" if default is None else (repr(default) if default == "" else default)
        text = f.metadata.get("doc", "")
        type_name = _type_name(hints[f.name])
        if f.metadata.get("path"):  # a str that names a file or directory (~ expands)
            type_name = type_name.replace("str", "path", 1)
        lines.append(f"{key} ({type_name}, default {shown}){': ' + text if text else ''}")
        items = typing.get_args(tp)
        if typing.get_origin(tp) is list and items and dataclasses.is_dataclass(items[0]):
            lines.extend(describe(items[0], f"{key}[]."))  # the keys of each list entry
    return lines


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain Python data (for YAML/JSON), keys in field order."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, absolute_paths: bool = False) -> str:
    """The fully resolved config as YAML, loadable again with ``load_config``.

    ``absolute_paths``: path-valued keys (``doc(..., path=True)``, also in lists of sections) that name an
    existing file or directory are written absolute. A run directory's ``config.yaml`` is read again from other
    places: ``dist-kd export`` rebuilds the student from it, and a relative ``teacher.path`` then named another
    directory, or none, depending on where export ran. Names that are not files here (a shipped DeepSpeed JSON
    resolved from the package, a GLUE task) are kept as written.
    """
    data = config_to_dict(cfg)
    if absolute_paths:
        _absolute_paths(cfg, data)
    return yaml.safe_dump(data, sort_keys=False)


def _absolute_paths(section: Any, data: dict[str, Any]) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value and os.path.exists(value):
            data[f.name] = os.path.abspath(value)
        elif dataclasses.is_dataclass(value):
            _absolute_paths(value, data[f.name])
        elif isinstance(value, list):
            for item, item_data in zip(value, data[f.name], strict=True):
                if dataclasses.is_dataclass(item):
                    _absolute_paths(item, item_data)


# The config files of the training commands, in the key reference (docs/config.md).
REFERENCE = (
    ("dist_kd.train.general", "GeneralConfig", "general distillation (`dist-kd general`, launch/general.py)"),
    ("dist_kd.train.task_config", "TaskConfig", "task distillation (`dist-kd task`, launch/task.py)"),
)


def reference_markdown() -> str:
    """docs/config.md: every key of every training config with type, default and doc text (``--help``'s list)."""
    import importlib

    out = [
        "# Config keys",
        "",
        "Generated from the code by `python -m dist_kd.config > docs/config.md` (a test checks it is current);",
        "`dist-kd general --help` and `dist-kd task --help` print the same list. Set a key in the YAML file or on",
        "the command line as `key.sub=value`; an unknown key is an error naming the closest known one (where",
        "none is close, the keys of its section, or where to find them), and `--print-config` prints the",
        "resolved config and exits. A `str` or `path` key takes its value as written",
        "(`run.output_dir=001` is `001`, not YAML's 1; quote `yes`/`no`/`on`/`off`), and a `path` key expands a",
        "leading `~` to the home directory. A number key reads leading zeros in decimal (`train.max_steps=0300` is",
        "300, not YAML's octal 192) and refuses YAML's base-60 numbers (`1:30`).",
    ]
    for module, name, title in REFERENCE:
        cls = getattr(importlib.import_module(module), name)
        out += ["", f"## {title}", ""]
        for line in describe(cls):
            key, rest = line.split(" ", 1)
            out.append(f"- `{key}` {rest}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
