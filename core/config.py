"""One typed config system for every entry point.

A config is a (nested) dataclass. Values come from, in order: the dataclass defaults, an optional YAML
file, then ``dotted.key=value`` overrides from the command line. Unknown keys and values of the wrong
type are errors that name the key, so a typo never silently trains the wrong run; a key a class lists in
``moved_settings`` (old name -> new dotted name) names its new place.

A section whose defaults depend on one of its own settings has a ``layered_defaults(given)`` classmethod:
``from_dict`` lays the given keys over what it returns. The model's ``size`` works so
(``biomedgpt.models.config.ModelSpec``): the file and the overrides are merged into one mapping first, then
the size's row fills the fields that mapping does not set.

``--config`` takes a file path or the name of a packaged recipe (``demo``, ``pretrain_base``,
``finetune/vqa_rad``: the files under ``configs/``). Fields typed ``PathStr`` are file-system paths:
a relative one written in a config *file* resolves against that file's folder; in a packaged recipe and
on the command line it resolves against the current directory (packaged recipes are templates that
write under ``./runs/``). URLs (``s3://...``) are left alone.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml

from biomedgpt.core.user_errors import UserError, report

T = TypeVar("T")

#: The installed package's root (``site-packages/biomedgpt``, or the repository in a checkout).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_ROOT / "configs"


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), which reads ``1e-3`` and ``5E-5`` as strings (1.1 wants ``1.0e-3``),
    with YAML 1.2's floats: an exponent without a dot is a number too, in files and on the command line."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


class PathStr(str):
    """Annotation for a setting that is a file-system path (resolved as the module docstring says)."""


def packaged_configs() -> list[str]:
    """Names of the packaged recipes (``--config NAME``)."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_config(name_or_path: str | Path) -> tuple[Path, bool]:
    """``(file, packaged)`` for ``--config``: an existing path, else a packaged recipe's name."""
    path = Path(name_or_path)
    if path.is_file():
        return path, path.resolve().is_relative_to(CONFIG_DIR)
    name = str(name_or_path).removeprefix("configs/")
    packaged = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if packaged.is_file():
        return packaged, True
    raise ConfigError(f"config file not found: {name_or_path} (neither a file nor a packaged recipe; "
                      f"packaged: {', '.join(packaged_configs())})")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit its dataclass."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting where lossless), naming ``key`` on error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error says more than "fits none of"
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} fits none of {[_type_name(a) for a in options]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str or tp is PathStr:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "moved_settings", {})  # a renamed key: name its new place
    if renamed := [f"{prefix}{key} is now {moved[key]}" for key in unknown if key in moved]:
        raise ConfigError(f"{'; '.join(renamed)}: rename it in the config file or override")
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"known: {sorted(fields)}"
        )
    missing = [prefix + name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting(s) {missing} for {cls.__name__}")
    layered_defaults = getattr(cls, "layered_defaults", None)
    if layered_defaults is not None:  # defaults chosen by a given setting (a model size's row), under the given keys
        data = {**layered_defaults(data), **data}
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict:
    """Plain-data form of a config (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating the levels that are missing; a mapping value is merged
    into a mapping already there (``model={heads: 8}`` keeps the section's other settings)."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a mapping")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        value = deep_merge(node[parts[-1]], value)
    node[parts[-1]] = value


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_path_type(tp: Any) -> bool:
    return tp is PathStr or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                             and PathStr in typing.get_args(tp))


def _item_dataclass(tp: Any) -> Any:
    """The dataclass inside ``tp`` (itself, Optional[...] of it, or list[...] of it), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def resolve_paths(cls: type, data: Any, root: Path) -> Any:
    """``data`` with every relative ``PathStr`` value of ``cls`` made absolute against ``root``."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        if _is_path_type(tp) and isinstance(value, str) and value and "://" not in value:
            path = Path(value).expanduser()
            out[key] = str(path if path.is_absolute() else root / path)
        elif (sub := _item_dataclass(tp)) is not None:
            if isinstance(value, list):
                out[key] = [resolve_paths(sub, v, root) for v in value]
            else:
                out[key] = resolve_paths(sub, value, root)
    return out


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping (one-line errors for a missing file or bad YAML)."""
    path = Path(path)
    try:
        loaded = parse_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.MarkedYAMLError as exc:
        where = f", line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def read_json(path: Path, error: type[Exception], missing: str) -> Any:
    """A JSON file's content; a missing file (``missing`` says what it was meant to be) or bad JSON raises
    ``error`` naming the file, in one line."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing ({missing})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from None


def _annotation_at(cls: type, dotted: str) -> Any:
    """The annotation of setting ``a.b.c`` of ``cls`` (through nested and Optional sections), else None."""
    tp: Any = cls
    for part in dotted.split("."):
        section = _item_dataclass(tp) if typing.get_origin(tp) is not list else None
        if section is None:
            return None
        tp = typing.get_type_hints(section).get(part)
        if tp is None:
            return None
    return tp


_TEXT_TYPES = (str, PathStr, Optional[str], Optional[PathStr])
_YAML_NULLS = ("null", "Null", "NULL", "~")


def override_value(cls: type, dotted: str, raw: str) -> Any:
    """The value of override ``dotted=raw``: a text setting (str, PathStr, or Optional of them) takes the
    raw text as written (``text=SUBJECT: a: b``), an Optional one ``null`` / ``~`` as None; every other
    setting parses ``raw`` as a YAML scalar or flow collection. A tag the safe loader does not construct
    (``seed=!!python/object/apply:os.system [...]``) stays the text ``'!!python/...'``, refused as not an
    integer: nothing is constructed or run."""
    tp = _annotation_at(cls, dotted)
    if tp in _TEXT_TYPES:
        return None if tp in _TEXT_TYPES[2:] and raw in _YAML_NULLS else raw
    if raw == "":
        return ""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError:  # no YAML: the text typed, for the setting's type to accept or refuse in one line
        return raw


def read_settings(cls: type, path: str | Path) -> tuple[Path, dict]:
    """``(file, settings)`` of a config file or packaged recipe for ``cls``: the keys as written, relative
    ``PathStr`` values resolved (not yet checked: ``from_dict`` does that)."""
    path, packaged = resolve_config(path)
    root = Path.cwd() if packaged else path.resolve().parent
    return path, resolve_paths(cls, read_yaml(path), root)


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file or packaged recipe <- ``key.sub=value`` overrides (``override_value``)."""
    data: dict = {}
    if path is not None:
        path, data = read_settings(cls, path)
    from_file = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), override_value(cls, key.strip(), raw))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        if path is None:
            raise
        where = path
        if overrides:  # name the file only when the file itself is wrong
            try:
                from_dict(cls, from_file)
                where = "command line"
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {exc}") from None


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Command line of every entry point: ``[--config FILE.yaml] [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=settings_help(cls) + "\n\nPackaged configs (--config NAME): " + ", ".join(packaged_configs()),
    )
    parser.add_argument("--config", help="YAML file with settings, or a packaged recipe's name "
                                             "(e.g. pretrain_base, finetune/vqa_rad; listed below)")
    # The DeepSpeed launcher passes --local_rank (LOCAL_RANK is also in the environment, which is read).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        return load(cls, args.config, args.overrides)
    except ConfigError as exc:  # one line (no usage block), once per job, exit 1: as every user error
        report(exc, prog=parser.prog)
        raise SystemExit(1) from None


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every setting of ``cls`` as a dotted key (nested dataclasses expanded)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(field_paths(tp, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


_FIELD_LINE = re.compile(r"^    (\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^    #\s?(.*)$")


def field_descriptions(cls: type) -> dict[str, str]:
    """Each field's description: the comment on its line in the class source, or the comment lines just
    above it (the settings' documentation lives next to their declaration, shown by ``--help``)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:  # a subclass's own fields first, then those it inherits (ModelSpec's)
        if dataclasses.is_dataclass(klass):
            for name, text in _source_descriptions(klass).items():
                out.setdefault(name, text)
    return out


def _source_descriptions(cls: type) -> dict[str, str]:
    """The descriptions of the fields ``cls``'s own source declares."""
    out: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    # a comment block describes each field under it, up to a blank line or a field with a comment of its own
    above: list[str] = []
    after_field = False
    for line in lines:
        if (comment := _COMMENT_LINE.match(line)) is not None:
            above = ([] if after_field else above) + [comment.group(1).strip()]
            after_field = False
            continue
        if (found := _FIELD_LINE.match(line)) is not None and not line.lstrip().startswith(("def ", "@")):
            text = found.group(2) or " ".join(above)
            if text:
                out.setdefault(found.group(1), text.strip())
            if found.group(2):
                above = []
            after_field = True
            continue
        above, after_field = [], False
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return repr(value) if not dataclasses.is_dataclass(value) else ""
    return "required"


def _annotation_text(tp: Any) -> str:
    text = str(tp) if typing.get_args(tp) else _type_name(tp)
    for noise in ("typing.", "biomedgpt.core.config.", "biomedgpt.data.config.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None")


def settings_help(cls: type, prefix: str = "") -> str:
    """Every setting of ``cls`` as ``dotted.key  (type, default)  description`` lines, for ``--help``."""
    hints = typing.get_type_hints(cls)
    notes = field_descriptions(cls)
    rows = [] if prefix else ["Settings (key=value overrides; type, default, what):"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ else ""
            rows.append(f"\n{prefix}{f.name}.*  {doc}")
            rows.append(settings_help(tp, prefix + f.name + "."))
            continue
        item = _item_dataclass(tp)
        if item is not None and typing.get_origin(tp) is list:  # a list of sections: each item's keys
            rows.append(f"  {prefix}{f.name}  (list of {item.__name__}, {_default_text(f)})  "
                        f"{notes.get(f.name, '')}".rstrip())
            rows.append(settings_help(item, prefix + f.name + "[]."))
            continue
        line = f"  {prefix}{f.name}  ({_annotation_text(tp)}, {_default_text(f)})"
        if f.name in notes:
            line += f"  {notes[f.name]}"
        rows.append(line)
    return "\n".join(rows)
