"""Typed configs: dataclasses with a one-line docstring per field; YAML is only how they are stored.

    @dataclass
    class PruneConfig:
        model: str = "default"
        \"\"\"HF directory, .gguf file or `default`.\"\"\"

`from_dict(PruneConfig, data)` checks unknown keys (with a suggestion), types, and runs the class's
`__post_init__`; every error names the dotted key path and what was expected. `apply_overrides`
applies CLI `key.sub=value` strings (values parsed as YAML scalars).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import ConfigError, EdgesmithError


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(key, f"expected one of {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-2 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(key, f"expected a path, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, validating keys and types; errors name the key path."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(key, f"unknown key{hint}")
        kwargs[k] = _coerce(hints[k], v, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.prefixed(prefix) if prefix else e
    except TypeError as e:  # a required field is missing
        raise ConfigError(prefix, str(e)) from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """'distill.temperature=2.0' -> (['distill', 'temperature'], 2.0)."""
    if "=" not in text:
        raise ConfigError(text, "override must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "override has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides to a raw mapping (validation happens in from_dict)."""
    data = dict(data or {})
    for ov in overrides or []:
        path, value = parse_override(ov)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(".".join(path[: i + 1]), f"is {nxt!r}, not a mapping; cannot set {ov}")
            else:
                nxt = node[part] = dict(nxt)
            node = nxt
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise EdgesmithError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EdgesmithError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise EdgesmithError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgesmithError(f"{p}: expected a mapping of recipe keys at the top level")
    return data


# pipeline recipes (`stages:` mapping) hold every stage's settings; a stage command given one reads its own section
STAGE_OF = {"PruneConfig": "prune", "DistillConfig": "distill", "FinetuneConfig": "finetune", "ExportConfig": "export",
            "BenchSettings": "bench"}
MODEL_KEY = {"prune": "model", "distill": "teacher", "finetune": "model", "export": "model"}
# keys of a pipeline's stages.<stage> section that only the pipeline uses: the bench stage's choice of artifacts
# (`edgesmith bench` takes its artifacts from the command line, and the recipe's measurement settings from here)
PIPELINE_ONLY = {"bench": ("corpus_chunks", "teacher", "export_formats", "teacher_quants", "teacher_source_gguf")}


def load_stage_yaml(path: str | Path, cls: type) -> dict:
    """A stage's settings from either a flat settings file or a pipeline recipe (its `stages.<stage>` section)."""
    data = load_yaml(path)
    if "stages" not in data:
        return data
    stage = STAGE_OF.get(cls.__name__)
    stages = data.get("stages") or {}
    if stage is None or not isinstance(stages, dict) or stage not in stages:
        raise EdgesmithError(f"{path}: pipeline recipe has no stages.{stage} section "
                             f"(it has {', '.join(stages) if isinstance(stages, dict) else 'none'})")
    section = {k: v for k, v in (stages[stage] or {}).items() if k not in PIPELINE_ONLY.get(stage, ())}
    if "model" in data and stage in MODEL_KEY and MODEL_KEY[stage] not in section:
        section[MODEL_KEY[stage]] = data["model"]
    return section


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None):
    """YAML file (optional) + base mapping + overrides -> validated `cls`; errors name file and key."""
    data = dict(base or {})
    if path:
        data.update(load_yaml(path))
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path:
            raise EdgesmithError(f"{path}: {e}") from None
        raise


def add_dataclass_args(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Expose each scalar field of `cls` as --field-name, help from its docstring, default None."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")  # argparse %-formats help text
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=__import__("argparse").BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=_type_name(tp).upper().replace(" ", "_")[:20], help=help_)


def args_to_overrides(args, cls: type, skip: tuple[str, ...] = ()) -> dict:
    """Collect the --field flags given on the command line (not None) into a raw mapping."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if isinstance(v, str) and hints[f.name] is not str:
            try:
                v = yaml.safe_load(v)
            except yaml.YAMLError:
                pass
        out[f.name] = v
    return out


# ---------------------------------------------------------------- command line -> config (every stage command)


FLAG_GROUPS = ("train",)  # nested settings whose fields are flags too (corpus.* shares names with train.*: --set only)


def add_config_args(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """--recipe, --set, every scalar field of `cls` as --field-name, and the nested settings in FLAG_GROUPS (a
    stage's `train:`) as their own group of flags. Fields in `skip` get hand-written flags (positional model,
    registries with argparse choices, lists given as CSV) whose values reach `config_from_args` as `given`."""
    parser.add_argument("--recipe", default=None,
                        help="YAML settings file or pipeline recipe (its stages.<stage> section); flags override it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any settings key, e.g. --set train.lr=1e-4 or --set jobs=1 (repeatable)")
    add_dataclass_args(parser, cls, skip=skip)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in FLAG_GROUPS and f.name not in skip and dataclasses.is_dataclass(hints[f.name]):
            add_dataclass_args(parser.add_argument_group(f"{f.name} settings"), hints[f.name])


def config_from_args(cls: type, args, given: dict | None = None):
    """Recipe < hand-written flags (`given`, None = not given) < generated flags < --set -> validated `cls`; errors
    name the recipe file and the key. A nested settings mapping the recipe gives in part (e.g. `train: {lr: 1e-4}`)
    keeps the stage's own defaults for the rest (distill's learning rate is not finetune's)."""
    data = load_stage_yaml(args.recipe, cls) if getattr(args, "recipe", None) else {}
    hints = typing.get_type_hints(cls)
    nested = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    for f in nested:
        if f.default_factory is not dataclasses.MISSING and (f.name not in data or isinstance(data[f.name], dict)):
            data[f.name] = {**to_dict(f.default_factory()), **(data.get(f.name) or {})}
    data.update({k: v for k, v in (given or {}).items() if v is not None})
    data.update(args_to_overrides(args, cls, skip=tuple(given or ())))  # hand-written flags arrive parsed, in `given`
    for f in (f for f in nested if f.name in FLAG_GROUPS):
        flags = args_to_overrides(args, hints[f.name])
        if flags:
            data[f.name] = {**(data.get(f.name) or {}), **flags}
    data = apply_overrides(data, getattr(args, "overrides", None) or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if getattr(args, "recipe", None):
            raise EdgesmithError(f"{args.recipe}: {e}") from None
        raise
