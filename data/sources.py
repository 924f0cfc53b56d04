"""Reading dialogue rows from where users keep them, with a policy for bad rows.

Sources: JSONL, JSON (a list of rows) and Parquet files; a dataset saved with
`save_to_disk`; a dataset on the Hugging Face hub by id (`org/name`, split via
`split=`); and the built-in `corpus:chitchat`.

Policy for invalid rows: `error` (the default) stops after reading everything
and lists the first problems with the total; `skip` goes on, counts them, and
writes each skipped row with its reasons to a rejects file. Either way every
row is accounted for in the returned `LoadReport`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dialogrl.data.records import Problem, Record, RowError, normalise_row

OnInvalid = Literal["error", "skip"]
CORPUS_PREFIX = "corpus:"


class DataError(ValueError):
    """Data that cannot be used as given; the message says where and what to do."""


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    formats: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    rejected_rows: int = 0
    rejects_path: str | None = None

    def summary(self) -> str:
        formats = ", ".join(f"{k}: {v}" for k, v in sorted(self.formats.items())) or "none"
        text = f"{self.source}: {self.rows} rows, {self.kept} valid, {self.rejected_rows} invalid (formats: {formats})"
        if self.rejects_path:
            text += f"; rejects written to {self.rejects_path}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "rejected_rows": self.rejected_rows,
            "formats": dict(self.formats),
            "rejects_path": self.rejects_path,
        }


def iter_rows(source: str, *, split: str = "train") -> Iterator[tuple[int, Any]]:
    """(1-based row number, raw row) pairs; unreadable lines come back as `RowError`s, not exceptions."""
    if source.startswith(CORPUS_PREFIX):
        from dialogrl.data.corpora import corpus_rows

        yield from corpus_rows(source.removeprefix(CORPUS_PREFIX), split=split)
        return
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_rows(path)
        elif suffix == ".json":
            yield from _json_rows(path)
        elif suffix == ".parquet":
            yield from _dataset_rows(_load_parquet(path))
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        return
    if path.is_dir():
        yield from _dataset_rows(_load_from_disk(path, split))
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"{source}: no such file or directory (and not a hub dataset id of the form org/name)")
    yield from _dataset_rows(_load_hub(source, split))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    # Read as bytes, so one line that is not UTF-8 is a bad row, not an exception for the whole file.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, RowError([("line", f"is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                                 f"{err.start + 1}); re-encode the file as UTF-8")])
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, RowError([("line", f"invalid JSON ({err.msg} at column {err.colno})")])


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json source must hold a list of rows (or {{\"data\": [...]}}), got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _dataset_rows(dataset) -> Iterator[tuple[int, Any]]:
    for index, row in enumerate(dataset, start=1):
        yield index, dict(row)


def _load_parquet(path: Path):
    from datasets import Dataset

    try:
        return Dataset.from_parquet(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable Parquet file ({reason})") from None


def _load_from_disk(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a directory, but not a dataset saved with save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(dataset)}")
        dataset = dataset[split]
    return dataset


def _load_hub(repo_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=split)
    except Exception as err:  # offline, missing, gated: all mean "cannot use this id here"
        raise DataError(
            f"{repo_id}: cannot load this dataset from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without hub access, save it elsewhere with save_to_disk or as JSONL and pass the path."
        ) from None


def load_records(
    source: str,
    *,
    split: str = "train",
    on_invalid: OnInvalid = "error",
    rejects_path: str | Path | None = None,
    limit: int | None = None,
    forbidden_substrings: Sequence[str] = (),
    max_chars: int | None = None,
    row_check: Callable[[Record], list[tuple[str, str]]] | None = None,
    show: int = 20,
) -> tuple[list[Record], LoadReport]:
    """Read and check every row of a source; apply the invalid-row policy.

    `row_check` adds checks that need more than the row itself (its token count
    under a model's template, say); its (field, reason) pairs reject the row too.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    report = LoadReport(source=source)
    records: list[Record] = []
    rejects = []
    for number, raw in iter_rows(source, split=split):
        if limit is not None and report.rows >= limit:
            break
        report.rows += 1
        try:
            if isinstance(raw, RowError):
                raise raw
            record = normalise_row(raw, forbidden_substrings=forbidden_substrings, max_chars=max_chars)
            extra = row_check(record) if row_check is not None else []
            if extra:
                raise RowError(extra)
        except RowError as err:
            row_problems = [Problem(source, number, f, r) for f, r in err.problems]
            report.problems.extend(row_problems)
            report.rejected_rows += 1
            rejects.append({"row": number, "problems": [p.to_dict() for p in row_problems],
                            "record": None if isinstance(raw, RowError) else raw})
            continue
        record.meta.setdefault("source_row", number)
        report.formats[record.meta["format"]] += 1
        records.append(record)
    report.kept = len(records)
    if report.problems and on_invalid == "error":
        raise DataError(format_problems(report, show=show) + "\nFix these rows, or set on_invalid: skip to drop "
                        "them into a rejects file.")
    if rejects and rejects_path is not None:
        report.rejects_path = str(write_rejects(rejects, rejects_path))
    return records, report


def write_rejects(rejects: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for reject in rejects:
            handle.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")
    return path


def format_problems(report: LoadReport, *, show: int = 20) -> str:
    lines = [f"{report.rejected_rows} of {report.rows} rows in {report.source} are invalid "
             f"({len(report.problems)} problems):"]
    lines += [f"  {p}" for p in report.problems[:show]]
    if len(report.problems) > show:
        lines.append(f"  ... and {len(report.problems) - show} more")
    return "\n".join(lines)
