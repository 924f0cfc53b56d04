"""Which recipe and inputs made an output.

An output directory (a trained model, a data build, an eval report) is complete
only for the exact resolved recipe and inputs that produced it. A fingerprint
records both: the recipe as flattened `dotted.key: value` pairs, and an identity
for every path the recipe names:

- a dialogrl output (a directory, or a file inside one, whose record
  `run_summary.json` or `manifest.json` carries an `output_id`):
  that id, new each time the output is written, so whatever was made from an
  older copy is stale even when the recipe that rebuilt it is the same;
- any other file: its sha256 (size and mtime beyond `HASHED_FILE_LIMIT`);
- any other directory: the size and mtime of every file in it;
- a reference that is not a path but stands for files on disk (`packaged:NAME`): what the
  layer that resolves it registers with `register_reference_identity`.

Keys that say where or how a run is recorded, not what it computes
(`output_dir`, `resume`, `tracking`), are left out, so an interrupted run can
resume and a finished one can be logged elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINGERPRINT_FILENAME = "fingerprint.json"
RECORD_FILENAMES = ("run_summary.json", "manifest.json")
IGNORED_KEYS = ("output_dir", "resume", "tracking")
# Keys whose values are names, never paths: `stage: data` run from the repository root named the package's
# own data/ directory, so every edit there (or a new __pycache__) made the data step stale and rebuilt it.
NAME_KEYS = ("stage",)
HASHED_FILE_LIMIT = 512 * 2**20
_RECORD_SEARCH_DEPTH = 2  # a file in an output (data/sft.jsonl) or its merged/ model: up to the grandparent
# `packaged:NAME` names a directory only the training layer can locate, and data/ must not import it. Without
# an identity a refetched or upgraded packaged model left every step, sample cache and report made from the
# old weights looking current.
_REFERENCE_IDENTITIES: list[Callable[[str], str | None]] = []


def register_reference_identity(identify: Callable[[str], str | None]) -> None:
    """Identify non-path references: `identify(value)` returns an identity string, or None when the
    value is not one of its references."""
    if identify not in _REFERENCE_IDENTITIES:
        _REFERENCE_IDENTITIES.append(identify)


@dataclass(frozen=True)
class Fingerprint:
    recipe: dict[str, Any]  # dotted key -> value (JSON types)
    inputs: dict[str, str]  # path as the recipe names it -> identity

    @property
    def digest(self) -> str:
        canonical = json.dumps({"recipe": self.recipe, "inputs": self.inputs}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "recipe": self.recipe, "inputs": self.inputs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        return cls(dict(data["recipe"]), dict(data["inputs"]))

    def changes_from(self, before: Fingerprint, limit: int = 8) -> list[str]:
        """What differs from `before`, one line per key or input, most `limit` lines."""
        lines = []
        for key in sorted(set(before.recipe) | set(self.recipe)):
            old, new = before.recipe.get(key, "(unset)"), self.recipe.get(key, "(unset)")
            if old != new:
                lines.append(f"{key}: {_short(old)} -> {_short(new)}")
        for path in sorted(set(before.inputs) | set(self.inputs)):
            if path not in self.inputs:
                lines.append(f"{path}: no longer read as an input")
            elif path not in before.inputs:
                lines.append(f"{path}: read as an input now")
            elif before.inputs[path] != self.inputs[path]:
                lines.append(f"{path}: its contents changed")
        if len(lines) > limit:
            lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
        return lines


def fingerprint(recipe: dict[str, Any], ignored: tuple[str, ...] = IGNORED_KEYS) -> Fingerprint:
    """The fingerprint of a resolved recipe (as `recipe_to_dict` gives it) and of the paths it names.
    Paths inside the recipe's own `output_dir` are what the run writes, not what it reads: not identified."""
    flat = {key: value for key, value in _flatten(recipe) if not _is_ignored(key, ignored)}
    own = Path(recipe["output_dir"]).resolve() if isinstance(recipe.get("output_dir"), str) else None
    inputs = {}
    for value in _strings(v for key, v in flat.items() if key not in NAME_KEYS):
        if _names_a_path(value):
            if not (own is not None and _within(Path(value).resolve(), own)):
                inputs[value] = input_identity(Path(value))
        elif (identity := _reference_identity(value)) is not None:
            inputs[value] = identity
    return Fingerprint(flat, inputs)


def _reference_identity(value: str) -> str | None:
    for identify in _REFERENCE_IDENTITIES:
        identity = identify(value)
        if identity is not None:
            return identity
    return None


def new_output_id() -> str:
    return uuid.uuid4().hex


def input_identity(path: Path) -> str:
    """What a path holds now, as a short string that changes when its contents do."""
    record = _enclosing_output_id(path)
    if record is not None:
        return f"output:{record}"
    if path.is_file():
        stat = path.stat()
        if stat.st_size > HASHED_FILE_LIMIT:
            return f"file:{stat.st_size}:{stat.st_mtime_ns}"
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()[:16]}"
    listing = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        listing.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"dir:{listing.hexdigest()[:16]}"


def read_fingerprint(directory: Path) -> Fingerprint | None:
    """The fingerprint stored in `directory`, or None (absent or unreadable)."""
    try:
        return Fingerprint.from_dict(json.loads((Path(directory) / FINGERPRINT_FILENAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_fingerprint(directory: Path, fp: Fingerprint) -> None:
    path = Path(directory) / FINGERPRINT_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(fp.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    scratch.replace(path)


def _enclosing_output_id(path: Path) -> str | None:
    directory = path if path.is_dir() else path.parent
    for candidate in [directory, *directory.parents][: _RECORD_SEARCH_DEPTH + 1]:
        for name in RECORD_FILENAMES:
            try:
                record = json.loads((candidate / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("output_id"), str):
                return record["output_id"]
    return None


def _names_a_path(value: str) -> bool:
    """An existing path that names a file or a directory of its own: not the working directory or one
    above it (a value like "." or "..")."""
    if not value or "\n" in value or len(value) > 4096:
        return False
    path = Path(value)
    try:
        if not path.exists():
            return False
        resolved, here = path.resolve(), Path.cwd().resolve()
    except OSError:
        return False
    return resolved != here and resolved not in here.parents


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _flatten(value: Any, prefix: str = ""):
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


def _strings(values):
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _strings(value)
        elif isinstance(value, dict):
            yield from _strings(value.values())


def _is_ignored(key: str, ignored: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in ignored)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
