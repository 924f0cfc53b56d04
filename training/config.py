"""Typed YAML recipes.

A recipe is a YAML file that maps one-to-one onto a tree of dataclasses. Its
`stage` key names the recipe kind (`chat`, `sft`, ...), which picks the root
dataclass. Every field is declared with `option(...)`, which requires help
text, so `dialogrl recipe keys STAGE` can document any recipe.

Overrides use one syntax everywhere: `dotted.key=value` arguments after the
command's options, e.g. `dialogrl chat --config r.yaml sampling.temperature=0.7`.
The value is read as YAML (so `[a, b]`, `null`, `true` work), except for string
fields, which take the text verbatim.

Nothing here rewrites a recipe: an unknown key, a wrong type or a failed check
raises `RecipeError` naming the file (or override), the dotted key and, for a
misspelling, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from dialogrl.data.options import option

__all__ = ["RecipeError", "option", "register_recipe", "load_recipe", "save_recipe", "dump_recipe", "describe_recipe"]

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


class RecipeError(ValueError):
    """A recipe or override that does not parse or validate."""


# --------------------------------------------------------------------------- registry

RECIPE_KINDS: dict[str, type] = {}
# Stage name -> the module that registers its recipe class. Imported on first
# use, so commands that need no recipe do not pay for importing every stage.
STAGE_MODULES = {
    "chat": "dialogrl.training.chat",
    "data": "dialogrl.training.data_stage",
    "eval": "dialogrl.training.eval_stage",
    "sft": "dialogrl.training.sft",
    "reward": "dialogrl.training.reward",
    "dpo": "dialogrl.training.dpo",
    "ppo": "dialogrl.training.ppo",
    "pipeline": "dialogrl.training.pipeline",
}


def recipe_kinds() -> dict[str, type]:
    """Every recipe kind, after importing the modules that register them."""
    import importlib

    for module in STAGE_MODULES.values():
        importlib.import_module(module)
    return RECIPE_KINDS


def register_recipe(stage: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: the dataclass is the root of recipes whose `stage:` is `stage`."""

    def decorate(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if stage in RECIPE_KINDS and RECIPE_KINDS[stage] is not cls:
            raise ValueError(f"recipe stage {stage!r} is registered twice")
        cls.stage = stage  # type: ignore[attr-defined]
        RECIPE_KINDS[stage] = cls
        return cls

    return decorate


# --------------------------------------------------------------------------- loading


class _Override:
    """An override's raw text: parsed as YAML unless the target field is a string."""

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source


def parse_overrides(pairs: Iterable[str]) -> list[tuple[str, str]]:
    """Split `a.b=value` arguments; a malformed one raises `RecipeError`."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override {pair!r} is not of the form dotted.key=value (e.g. model.dtype=bfloat16)")
        parsed.append((key, value))
    return parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load_recipe(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    *,
    expected: type[T] | None = None,
) -> T:
    """Read a recipe file (or start from defaults when `path` is None), apply overrides, validate.

    `expected` is the recipe class the calling command runs; a recipe written for
    another stage is refused rather than half-read.
    """
    source = str(path) if path is not None else "<defaults>"
    data = read_yaml(path) if path is not None else {}
    stage = data.pop("stage", None)
    kinds = recipe_kinds()
    if stage is None:
        if expected is None:
            raise RecipeError(f"{source}: missing key 'stage' (one of: {', '.join(sorted(kinds))})")
        cls = expected
    else:
        if stage not in kinds:
            raise RecipeError(f"{source}: stage: unknown stage {stage!r}{_suggest(str(stage), kinds)}")
        cls = kinds[stage]
        if expected is not None and cls is not expected:
            raise RecipeError(
                f"{source}: this is a '{stage}' recipe, but the command runs '{expected.stage}' recipes"  # type: ignore[attr-defined]
            )
    for key, value in parse_overrides(overrides):
        _set_override(data, cls, key, _Override(value, f"override '{key}={value}'"), source)
    return _build(cls, data, source=source, prefix="")


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """The recipe as plain YAML-ready data, `stage` first."""
    body = dataclasses.asdict(recipe)
    stage = getattr(type(recipe), "stage", None)
    return {"stage": stage, **body} if stage else body


def dump_recipe(recipe: Any) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True, width=100)


def save_recipe(recipe: Any, output_dir: str | Path) -> Path:
    """Write the resolved recipe as `config.yaml` in `output_dir`; reloading it gives the same recipe."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / CONFIG_FILENAME
    target.write_text(dump_recipe(recipe))
    return target


def describe_recipe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field of a recipe class."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = prefix + f.name
        nested = _dataclass_in(hint)
        if nested is not None:
            rows.extend(describe_recipe(nested, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        minimum = f.metadata.get("minimum")
        help_text = f.metadata.get("help", "") + (f" (at least {minimum})" if minimum is not None else "")
        rows.append((key, _type_name(hint), default, help_text))
    return rows


# --------------------------------------------------------------------------- internals


def _suggest(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    return [row[0] for row in describe_recipe(cls, prefix)]


def _unknown_key_error(source: str, cls: type, root: type, prefix: str, key: str) -> RecipeError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        guess: str | None = prefix + close[0]
    else:
        # A key put under the wrong section, or misspelled with its section: search the whole recipe.
        paths = _leaf_paths(root)
        elsewhere = [p for p in paths if p.rsplit(".", 1)[-1] == key]
        close = difflib.get_close_matches(prefix + key, paths, n=1, cutoff=0.6)
        guess = elsewhere[0] if elsewhere else (close[0] if close else None)
    suggestion = f" (did you mean '{guess}'?)" if guess else ""
    section = f"'{prefix[:-1]}'" if prefix else "the recipe's top level"
    return RecipeError(
        f"{source}: unknown key '{prefix}{key}'{suggestion}. Valid keys in {section}: {', '.join(valid)}"
    )


def _set_override(data: dict, root: type, dotted: str, value: _Override, source: str) -> None:
    cls: type | None = root
    node = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth]) + "." if depth else ""
        assert cls is not None
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown_key_error(value.source, cls, root, prefix, part)
        if depth == len(parts) - 1:
            node[part] = value
            return
        nested = _dataclass_in(typing.get_type_hints(cls)[part])
        if nested is None:
            raise RecipeError(f"{value.source}: '{prefix}{part}' is a value, not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, cls = child, nested


def _build(cls: type[T], data: Mapping[str, Any], *, source: str, prefix: str, root: type | None = None) -> T:
    root = root or cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(source, cls, root, prefix, str(key))
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        nested = _dataclass_in(hints[name])
        if nested is not None and f.default_factory is not dataclasses.MISSING:
            # A section's own defaults (`default_factory=lambda: SamplingConfig(temperature=0.7)`) hold for the
            # keys the recipe leaves out, not the section class's: it reads the factory's values first.
            given = data.get(name, {})
            if isinstance(given, Mapping):
                kwargs[name] = _build(nested, _overlay(f.default_factory(), given), source=source,
                                      prefix=key + ".", root=root)
                continue
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], source=source, key=key, root=root)
            minimum = f.metadata.get("minimum")
            if minimum is not None and kwargs[name] is not None and kwargs[name] < minimum:
                raise RecipeError(f"{source}: '{key}' must be >= {minimum}, got {kwargs[name]}: {f.metadata['help']}")
        elif _dataclass_in(hints[name]) is not None and f.default is dataclasses.MISSING:
            # A section left out entirely takes its defaults.
            nested = _dataclass_in(hints[name])
            kwargs[name] = _build(nested, {}, source=source, prefix=key + ".", root=root)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: missing required key '{key}': {f.metadata.get('help', '')}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        where = f"'{prefix[:-1]}'" if prefix else "recipe"
        raise RecipeError(f"{source}: {where}: {err}") from None


def _overlay(defaults: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` over the fields of the dataclass instance `defaults`, section by section (dict values are
    replaced whole: a recipe that names `rejected: {natural: 1}` means only natural)."""
    if not dataclasses.is_dataclass(defaults):
        return dict(given)
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if f.name in given:
            inner = given[f.name]
            merged[f.name] = _overlay(value, inner) if dataclasses.is_dataclass(value) and isinstance(
                inner, Mapping) else inner
        else:
            merged[f.name] = _plain(value)
    merged.update({k: v for k, v in given.items() if k not in merged})  # unknown keys: _build names them
    return merged


def _plain(value: Any) -> Any:
    """A default value as a recipe would write it (sections as mappings, also inside lists)."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (also through Optional), else None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if _is_union(hint):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(hint))
        return f"{typing.get_origin(hint).__name__}[{args}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, *, source: str, key: str, root: type) -> Any:
    if isinstance(value, _Override):
        source = value.source
        if _accepts_plain_string(hint):
            return value.text
        try:
            value = yaml.safe_load(value.text) if value.text.strip() else None
        except yaml.YAMLError:
            value = value.text

    def fail(expected: str) -> RecipeError:
        return RecipeError(f"{source}: '{key}' expects {expected}, got {value!r}")

    if hint is Any:
        return value
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source=source, key=key, root=root)
            except RecipeError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail(_type_name(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise RecipeError(
            f"{source}: '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}"
            + _suggest(str(value), [str(c) for c in choices])
        )
    if dataclasses.is_dataclass(hint):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise fail(f"a section of keys ({', '.join(f.name for f in dataclasses.fields(hint))})")
        return _build(hint, value, source=source, prefix=key + ".", root=root)
    if origin in (list, tuple):
        (item_hint, *_rest) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            if isinstance(value, (str, int, float, bool)):
                value = [value]  # `report_to: wandb` means a list of one
            else:
                raise fail("a list")
        items = [_coerce(v, item_hint, source=source, key=f"{key}[{i}]", root=root) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {
            _coerce(k, key_hint, source=source, key=key, root=root): _coerce(
                v, value_hint, source=source, key=f"{key}.{k}", root=root
            )
            for k, v in value.items()
        }
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string; it is plainly a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise fail("a string (quote it in YAML)")
    raise RecipeError(f"{source}: '{key}' has an unsupported type {_type_name(hint)}")


def _accepts_plain_string(hint: Any) -> bool:
    if hint is str:
        return True
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args == [str]
    return False
