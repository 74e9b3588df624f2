"""Stage options declared once: a Pydantic field is the option's type, default, help and panel.

``opt(...)`` is a Pydantic ``Field`` that also records how the option appears on the command
line (flag name, help panel, positional argument). From a config model this module derives:

- ``option_specs``: one flat list of options, nested models (``generation``, ``backend``)
  included, each named by its flag with underscores (``--loss-top-k`` -> ``loss_top_k``);
- ``read_config_file``: a YAML or JSON file keyed by option names; a config dumped by rcsd
  (nested, field names) is accepted too, so ``rcsd_train_config.json`` reproduces its run;
- ``build_config``: model defaults < config file < flags given on the command line.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

from pydantic import BaseModel, Field, ValidationError

from rcsd_cli.errors import RcsdError

ModelT = TypeVar("ModelT", bound=BaseModel)


def opt(default: Any = ..., *, panel: str, help: str, flag: str | None = None, argument: bool = False,
        short: str | None = None, **field_kwargs) -> Any:
    """A config field that is also a command-line option (``flag`` defaults to ``--field-name``)."""
    cli: dict[str, Any] = {"panel": panel}
    if flag:
        cli["flag"] = flag
    if argument:
        cli["argument"] = True
    if short:
        cli["short"] = short
    if default is ... and "default_factory" in field_kwargs:
        return Field(description=help, json_schema_extra=_cli_extra("cli", cli), **field_kwargs)
    return Field(default, description=help, json_schema_extra=_cli_extra("cli", cli), **field_kwargs)


def nested(factory, *, flags: dict[str, str] | None = None, hide: tuple[str, ...] = (), help: str = "") -> Any:
    """A nested options model (e.g. ``generation``) whose fields become flat options.

    ``flags`` renames some of its options for this stage (``{"enable_thinking": "--student-thinking"}``);
    ``hide`` keeps fields out of the command line (still settable in a config file).
    """
    return Field(default_factory=factory, description=help,
                 json_schema_extra=_cli_extra("cli_nested", {"flags": flags or {}, "hide": list(hide)}))


def _cli_extra(key: str, value: dict[str, Any]) -> dict[str, Any]:
    """How a field appears on the command line, kept in its JSON Schema extra (and so in ``schemas/``)."""
    return {key: value}


@dataclass(frozen=True)
class OptionSpec:
    name: str                 # option name with underscores: the config-file key
    path: tuple[str, ...]     # field path in the config model
    flag: str
    annotation: Any
    default: Any
    help: str
    panel: str
    argument: bool = False
    short: str | None = None
    on_cli: bool = True


def _extra(field) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _default(field) -> Any:
    return field.get_default(call_default_factory=True)


def option_specs(model: type[BaseModel], prefix: tuple[str, ...] = (), defaults: BaseModel | None = None,
                 flags: dict[str, str] | None = None, hide: tuple[str, ...] = ()) -> list[OptionSpec]:
    specs = []
    for name, field in model.model_fields.items():
        extra = _extra(field)
        if "cli_nested" in extra:
            sub = extra["cli_nested"]
            group = typing.cast(type[BaseModel], field.annotation)  # nested() fields hold an options model
            specs += option_specs(group, prefix + (name,), _default(field), sub["flags"],
                                  tuple(sub["hide"]))
            continue
        cli = extra.get("cli")
        if defaults is not None:
            default = getattr(defaults, name)
        else:
            default = None if field.is_required() else _default(field)  # required: pydantic names it if unset
        flag = (flags or {}).get(name) or (cli or {}).get("flag") or "--" + name.replace("_", "-")
        specs.append(OptionSpec(
            name=flag.lstrip("-").replace("-", "_"), path=prefix + (name,), flag=flag, annotation=field.annotation,
            default=default, help=field.description or "", panel=(cli or {}).get("panel", "Options"),
            argument=bool((cli or {}).get("argument")), short=(cli or {}).get("short"),
            on_cli=cli is not None and name not in hide))
    return specs


def fold_flat_options(model: type[BaseModel], data: dict) -> dict:
    """Options of nested models given flat, by option name (``loss_top_k: 5``), moved to their place
    (``loss: {top_k: 5}``, ``rollout: {vllm: {enforce_eager: true}}``): the library, config files and
    the command line accept the same names.

    A key that is both a nested field and an option name (``loss``) is the nested model when its
    value is a mapping or a model, and the option (``--loss``) otherwise.
    """
    flat = _nested_option_paths(model)
    if not flat or not any(k in flat for k in data):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = flat.get(key)
        if path is None or (key in model.model_fields and isinstance(value, (dict, BaseModel))):
            out[key] = _merged(out.get(key), value) if key in out else value
        else:
            _place(out, path, value)
    return out


def with_options(cfg: ModelT, **changes) -> ModelT:
    """A copy of ``cfg`` with options changed by the names the command line and config files use (``lora_rank``,
    ``sharding``, ``temperature``): each lands in its group, and a changed group is copied, never shared. This
    is the one step that resolves flat names; pydantic's ``model_copy`` keeps its meaning (field names only)."""
    update = fold_flat_options(type(cfg), dict(changes))
    for field, value in update.items():
        current = getattr(cfg, field, None)
        if isinstance(value, dict) and isinstance(current, BaseModel):
            update[field] = with_options(current, **value)
    return cfg.model_copy(update=update)


def _as_dict(value) -> dict:
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else dict(value or {})


def _merged(base, top) -> dict:
    """``top`` over ``base``, mapping by mapping (models count as the fields they were given)."""
    out = _as_dict(base)
    for key, value in _as_dict(top).items():
        both = isinstance(value, (dict, BaseModel)) and isinstance(out.get(key), (dict, BaseModel))
        out[key] = _merged(out[key], value) if both else value
    return out


def _place(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node[part] = _as_dict(node.get(part))
        node = node[part]
    node[path[-1]] = value


def with_group_defaults(model: type[BaseModel], data: dict) -> dict:
    """Groups given in part (``generation: {top_p: 0.9}``) keep this stage's defaults for the rest.

    A stage sets its own defaults for a shared group (train samples at temperature 1.2, eval
    greedily); a mapping naming one of its options must not fall back to the group's class defaults.
    """
    out = dict(data)
    for name, field in model.model_fields.items():
        if "cli_nested" in _extra(field) and isinstance(out.get(name), dict):
            out[name] = _merged(_default(field), out[name])
    return out


_PATHS: dict[type, dict[str, tuple[str, ...]]] = {}


def _nested_option_paths(model: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """Option name -> field path, for the options that live in nested models (cached per model)."""
    if model not in _PATHS:
        has_nested = any("cli_nested" in _extra(f) for f in model.model_fields.values())
        _PATHS[model] = {s.name: s.path for s in option_specs(model) if len(s.path) > 1} if has_nested else {}
    return _PATHS[model]


def unwrap_optional(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False



# ----------------------------------------------------------------------------- config files


def read_config_file(path: str | Path, model: type[BaseModel]) -> dict[str, Any]:
    """Option values from a YAML/JSON file, keyed by option name; unknown keys are refused."""
    path = Path(path)
    if not path.is_file():
        raise RcsdError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise their own error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RcsdError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RcsdError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    specs = option_specs(model)
    by_name = {s.name: s for s in specs}
    by_path = {s.path: s for s in specs}
    groups = {s.path[:i] for s in specs for i in range(1, len(s.path))}
    out: dict[str, Any] = {}

    def take(mapping: dict, prefix: tuple[str, ...]) -> None:
        for key, value in mapping.items():
            key = str(key).replace("-", "_")
            here = prefix + (key,)
            if here in groups and isinstance(value, dict):
                take(value, here)
                continue
            spec = by_path.get(here) or by_name.get(key)
            if spec is None or spec.path[: len(prefix)] != prefix:
                hint = "" if prefix else f" (options of this stage: {', '.join(sorted(by_name))[:200]})"
                raise RcsdError(f"{path}: unknown key '{'.'.join(here)}'{hint}")
            out[spec.name] = value

    take(data, ())
    return out


def build_config(model: type[BaseModel], values: dict[str, Any], source: str = "options"):
    """The config model from flat option values (unset options keep the model's defaults)."""
    specs = {s.name: s for s in option_specs(model)}
    tree: dict[str, Any] = {}
    for name, value in values.items():
        node = tree
        *parents, leaf = specs[name].path
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise RcsdError(f"{source}: {describe_option_error(exc, model)}") from exc


def describe_option_error(err: ValidationError, model: type[BaseModel]) -> str:
    """The first validation failure, named by the option (``--loss-top-k``) rather than the field path."""
    first = err.errors()[0]
    by_path = {s.path: s for s in option_specs(model)}
    loc = tuple(str(p) for p in first["loc"])
    spec = by_path.get(loc)
    label = spec.flag if spec else ".".join(loc)
    if first["type"] == "missing":
        return f"{label} is required"
    value = first.get("input")
    shown = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    msg = first["msg"].removeprefix("Value error, ")
    if not label or (spec is None and first["type"] == "value_error"):  # a rule across options names them
        return msg
    return f"{label}: {msg}" + (f", got {shown[:60]}" if spec else "")


def changed_from_default(cfg: BaseModel, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (top-level fields) hold something other than their default."""
    fields = type(cfg).model_fields
    return [n for n in names if getattr(cfg, n) != _default(fields[n])]


def refuse_changed(cfg: BaseModel, names: tuple[str, ...], why: str) -> None:
    """A validator's refusal of options a run would ignore: ``--loss-top-k has no effect with ...``."""
    bad = changed_from_default(cfg, names)
    if bad:
        field = type(cfg).model_fields[bad[0]]
        flag = (_extra(field).get("cli") or {}).get("flag") or "--" + bad[0].replace("_", "-")
        raise ValueError(f"{flag} has no effect {why}")
