"""Bring your own data: tasks from local JSONL / JSON / CSV / parquet files, plus recipes for GSM8K and HotPotQA.

Why: a user's own data is the most common task. ``from_file`` reads a local file with ``datasets`` (never the
hub), maps its columns onto example fields, splits it deterministically by a hash of each row's inputs (or of
an id column) and gives it a Predict/ChainOfThought program and an exact/normalised/numeric-match rubric.
Registered as task ``file``, so an experiment YAML can say::

    task:
      name: file
      options: {path: data/qa.jsonl, field_map: {question: q, answer: a}, match: normalized}

The recipes ``gsm8k`` and ``hotpotqa`` (tasks ``gsm8k_file`` and ``hotpotqa_file``) read the official files from
a local download; see ``programs/README.md`` for where to get them. A missing file or a mapping to a missing
column is a specific error that names the path or the column and the columns that exist.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy

from metrics import ExactMatch, FormatValidity, NumericMatch, Rubric
from programs.registry import Task, TaskError, TaskOptionError
from programs.tasks.splits import DEFAULT_RATIOS, check_ratios, take

__all__ = ["DataFileError", "FieldMappingError", "FORMATS", "from_file", "gsm8k", "hotpotqa", "read_records"]

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
MATCHES = ("exact", "normalized", "numeric")


class DataFileError(TaskError, FileNotFoundError):
    """A data file is missing, unreadable, of an unsupported format, or has rows with missing values."""


class FieldMappingError(TaskError, KeyError):
    """A field mapping names a column the file does not have (the message lists the columns it has)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _format(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in set(FORMATS.values()):
            raise TaskOptionError(f"format must be one of {sorted(set(FORMATS.values()))}, got {format!r}")
        return format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(f"cannot tell the format of {path} from its suffix {path.suffix!r}; use one of "
                            f"{sorted(FORMATS)} or pass format='json'|'csv'|'parquet'")
    return fmt


def read_records(path: str | Path, format: str | None = None, cache_dir: str | Path | None = None) -> list[dict]:
    """All rows of a local file as dicts, read with ``datasets`` (json lines or a JSON array, csv/tsv, parquet).

    Raises:
        DataFileError: the file does not exist, its format is unknown, or ``datasets`` cannot parse it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileError(f"data file {path} not found (absolute: {path.resolve()}); cotune reads local files "
                            f"only and never downloads at run time")
    fmt = _format(path, format)
    if path.stat().st_size == 0 or (fmt == "json" and not _head(path).strip()):
        raise DataFileError(f"data file {path} is empty; it needs one example per line (JSON lines), a JSON array, "
                            "a CSV header and rows, or a parquet table")
    return list(_read(str(path.resolve()), path.stat().st_mtime_ns, fmt, None if cache_dir is None else str(cache_dir)))


def _head(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def _json_problem(path: Path) -> str | None:
    """Where a JSON / JSON-lines file stops being what ``datasets`` reads (``datasets`` only says it failed)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        return f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); is this a binary file?"
    if path.suffix.lower() != ".jsonl" and text.lstrip().startswith("["):  # a JSON array (.json)
        try:
            rows = json.loads(text)
        except ValueError as exc:
            return f"{path}: not valid JSON ({exc})"
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None) \
            if isinstance(rows, list) else None
        return None if bad is None else f"{path}: item {bad} of the JSON array is not an object"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            return f"{path}:{number}: not a JSON object ({exc}); JSON lines need one object per line"
        if not isinstance(row, dict):
            return f"{path}:{number}: a JSON line must be an object like {{\"question\": ...}}, got {type(row).__name__}"
    return None


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, fmt: str, cache_dir: str | None) -> tuple[dict, ...]:
    import datasets
    from datasets.utils import logging as ds_logging

    kwargs: dict[str, Any] = {"delimiter": "\t"} if fmt == "csv" and path.lower().endswith(".tsv") else {}
    bars_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    problem = _json_problem(Path(path)) if fmt == "json" else None  # our own message, with the line
    if problem is not None:
        raise DataFileError(f"could not read {problem}")
    try:
        data = datasets.load_dataset(fmt, data_files=path, split="train", cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # noqa: BLE001 - arrow/json/csv parse errors have many types
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the parser's error
            cause = cause.__cause__ or cause.__context__
        detail = " ".join(f"{type(cause).__name__}: {cause}".split())[:500]
        raise DataFileError(f"could not read {path} as {fmt}: {detail}") from exc
    finally:
        if bars_on:
            ds_logging.enable_progress_bar()
    return tuple(data.to_list())


def _check_mapping(path: Path, columns: Sequence[str], field_map: Mapping[str, str]) -> None:
    for field, column in field_map.items():
        if column not in columns:
            raise FieldMappingError(f"field {field!r} is mapped to column {column!r}, which {path.name} does not "
                                    f"have; its columns are {list(columns)}")


def _rubric(output: str, match: str) -> Rubric:
    if match == "numeric":
        correct = NumericMatch(output, name="correct")
    else:
        correct = ExactMatch(output, normalize=match == "normalized", name="correct")
    return Rubric([correct, FormatValidity([output])], weights={"correct": 3, "format": 1},
                  gates={"correct": "format"}, name="file")


def _examples_from_rows(
    rows: Sequence[dict], path: Path, input_fields: Sequence[str], field_map: Mapping[str, str] | None
) -> list[dspy.Example]:
    if not rows:
        raise DataFileError(f"{path} has no rows")
    columns = list(rows[0].keys())
    mapping = dict(field_map) if field_map else {c: c for c in columns}
    _check_mapping(path, columns, mapping)
    missing_inputs = [f for f in input_fields if f not in mapping]
    if missing_inputs:
        raise FieldMappingError(f"input fields {missing_inputs} are not among the mapped fields {list(mapping)}; "
                                f"map them in field_map (field -> column of {path.name}: {columns})")
    examples = []
    for i, row in enumerate(rows):
        values = {field: row.get(column) for field, column in mapping.items()}
        empty = [f for f, v in values.items() if v is None]
        if empty:
            raise DataFileError(f"row {i} of {path.name} has no value for {empty} (columns "
                                f"{[mapping[f] for f in empty]}); clean the file or map other columns")
        examples.append(dspy.Example(**values).with_inputs(*input_fields))
    return examples


def from_file(
    path: str,
    input_fields: Sequence[str] = ("question",),
    field_map: Mapping[str, str] | None = None,
    output_field: str | None = None,
    match: str = "normalized",
    ratios: Sequence[float] = DEFAULT_RATIOS,
    id_field: str | None = None,
    split_salt: str = "",
    format: str | None = None,
    cache_dir: str | None = None,
) -> Task:
    """A task from a local file (the registered ``file`` task).

    Args:
        path: A ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file.
        input_fields: Example fields given to the program.
        field_map: ``{example field: file column}``; ``None`` keeps every column under its own name.
        output_field: The field the program predicts and the rubric scores (default: the first non-input field).
        match: ``"exact"``, ``"normalized"`` (SQuAD-style) or ``"numeric"``.
        ratios: (train, val, test) fractions of the file.
        id_field: Example field whose value keys the split (default: the inputs' values); rows with equal keys
            are kept once.
        split_salt: Change it to deal a different (still disjoint) split.
        format: Override the format inferred from the suffix: ``json``, ``csv`` or ``parquet``.
        cache_dir: ``datasets`` cache folder (default: its own default).

    Raises:
        DataFileError: missing/unreadable file or empty values. FieldMappingError: a mapping to a missing column.
        TaskOptionError: bad ``match``/``ratios``/fields.
    """
    if match not in MATCHES:
        raise TaskOptionError(f"match must be one of {MATCHES}, got {match!r}")
    ratios = check_ratios(ratios)
    file = Path(path).expanduser()
    input_fields = [input_fields] if isinstance(input_fields, str) else list(input_fields)
    examples = _examples_from_rows(read_records(file, format, cache_dir), file, input_fields, field_map)
    fields = list(examples[0].keys()) if examples else list((field_map or {}).keys())
    outputs = [f for f in fields if f not in input_fields]
    output = output_field or (outputs[0] if outputs else None)
    if output is None or output not in fields or output in input_fields:
        raise FieldMappingError(f"no output field to predict: fields are {fields}, inputs {input_fields}; "
                                f"map an answer column (field_map={{'answer': '<column>'}}) or pass output_field=")
    if id_field is not None and id_field not in fields:
        raise FieldMappingError(f"id_field {id_field!r} is not among the example fields {fields}")
    return _file_task(f"file:{file.name}", f"Local data from {file}", examples, input_fields, output, match,
                      ratios, id_field, split_salt, {"path": str(file)})


def _file_task(name, description, examples, input_fields, output, match, ratios, id_field, salt, options,
               programs=None, rubric=None, gold_metric=None) -> Task:
    def key(example: dspy.Example) -> str:
        if id_field is not None:
            return str(example[id_field])
        return json.dumps({f: example[f] for f in input_fields}, sort_keys=True, default=str)

    def loader(split: str, n: int, seed: int) -> list[dspy.Example]:
        return take(examples, split, n, key=key, seed=seed, ratios=ratios, salt=salt)

    signature = f"{', '.join(input_fields)} -> {output}"
    return Task(
        name=name,
        description=description,
        loader=loader,
        programs=programs or {"predict": lambda: dspy.Predict(signature),
                              "cot": lambda: dspy.ChainOfThought(signature)},
        rubric_factory=rubric or (lambda: _rubric(output, match)),
        default_program="predict" if programs is None else next(iter(programs)),
        gold_metric=gold_metric,
        options={**options, "input_fields": list(input_fields), "output_field": output, "match": match,
                 "ratios": list(ratios)},
    )


# --- recipes ---------------------------------------------------------------------------------------------------


GSM8K_HELP = ("GSM8K is not bundled: download it once, e.g. `git clone https://github.com/openai/grade-school-math` "
              "(grade_school_math/data/train.jsonl, test.jsonl) or `huggingface-cli download openai/gsm8k "
              "--repo-type dataset --local-dir data/gsm8k` (main/*.parquet), then pass path=...")
HOTPOTQA_HELP = ("HotPotQA is not bundled: download hotpot_dev_distractor_v1.json from https://hotpotqa.github.io "
                 "or `huggingface-cli download hotpotqa/hotpot_qa --repo-type dataset --local-dir data/hotpotqa` "
                 "(distractor/*.parquet), then pass path=...")


def _require(path: str, help_text: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataFileError(f"data file {file} not found. {help_text}")
    return file


def gsm8k(path: str, ratios: Sequence[float] = DEFAULT_RATIOS, cache_dir: str | None = None) -> Task:
    """GSM8K from a local ``.jsonl`` or ``.parquet`` (columns ``question``, ``answer`` = rationale + ``#### N``).

    Examples get ``answer`` = the final number and ``rationale`` = the worked solution; programs and rubric are the
    ``gsm`` task's (ChainOfThought, numeric match). Point ``path`` at the official test file with
    ``ratios=(0, 0, 1)`` to evaluate on it.
    """
    from programs.tasks import gsm

    file = _require(path, GSM8K_HELP)
    rows = read_records(file, None, cache_dir)
    columns = list(rows[0]) if rows else []
    _check_mapping(file, columns, {"question": "question", "answer": "answer"})
    examples = []
    for i, row in enumerate(rows):
        rationale, sep, final = str(row["answer"]).rpartition("####")
        if not sep:
            raise DataFileError(f"row {i} of {file.name}: the answer has no '#### <number>' line; is this GSM8K?")
        examples.append(dspy.Example(question=row["question"], answer=final.strip().replace(",", ""),
                                     rationale=rationale.strip()).with_inputs("question"))
    return _file_task("gsm8k_file", f"GSM8K from {file}", examples, ["question"], "answer", "numeric",
                      check_ratios(ratios), None, "", {"path": str(file)},
                      programs={"cot": gsm.cot_program, "predict": gsm.predict_program}, rubric=gsm.rubric,
                      gold_metric=Rubric([NumericMatch("answer", name="correct")], name="gsm_gold"))


def _hotpot_rows(file: Path, cache_dir: str | None) -> list[dict]:
    if file.suffix.lower() == ".json":  # the official file: a JSON array with mixed-type lists arrow cannot type
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataFileError(f"could not parse {file} as JSON: {exc}") from exc
        if not isinstance(data, list):
            raise DataFileError(f"{file} is not a JSON array of HotPotQA records")
        return data
    return read_records(file, None, cache_dir)


def _paragraphs(context: Any) -> list[tuple[str, str]]:
    """(title, text) of a record's context, in the official ([[title, sents]]) or HF ({title, sentences}) layout."""
    if isinstance(context, Mapping):
        return [(t, "".join(s)) for t, s in zip(context["title"], context["sentences"], strict=True)]
    return [(t, "".join(s)) for t, s in context]


def _support_titles(facts: Any) -> list[str]:
    titles = facts["title"] if isinstance(facts, Mapping) else [f[0] for f in facts]
    return list(dict.fromkeys(titles))


def hotpotqa(path: str, k: int = 3, ratios: Sequence[float] = DEFAULT_RATIOS, cache_dir: str | None = None) -> Task:
    """HotPotQA (distractor setting) from a local download, run by the multi-hop programs.

    Every context paragraph of the file becomes a passage of one BM25 corpus (titles are the passage ids), so
    ``TwoHopQA`` retrieves over the whole file's distractor pool; the rubric is the ``multihop`` task's
    (normalised exact match, format, recall of the supporting-fact titles).
    """
    from programs.tasks import multihop
    from programs.tasks.corpus import Passage, Retriever

    file = _require(path, HOTPOTQA_HELP)
    rows = _hotpot_rows(file, cache_dir)
    columns = list(rows[0]) if rows else []
    _check_mapping(file, columns, {"question": "question", "answer": "answer", "context": "context",
                                   "supporting_facts": "supporting_facts"})
    pool: dict[str, Passage] = {}
    examples = []
    for row in rows:
        for title, text in _paragraphs(row["context"]):
            pool.setdefault(title, Passage(title, title, re.sub(r"\s+", " ", text).strip()))
        examples.append(dspy.Example(question=row["question"], answer=row["answer"],
                                     gold_ids=_support_titles(row["supporting_facts"]),
                                     id=row.get("_id") or row.get("id")).with_inputs("question"))
    retriever = Retriever(list(pool.values())) if pool else None
    if retriever is None:
        raise DataFileError(f"{file} has no context paragraphs to retrieve from")
    return _file_task("hotpotqa_file", f"HotPotQA from {file}", examples, ["question"], "answer", "normalized",
                      check_ratios(ratios), "id" if all(e.id for e in examples) else None, "", {"path": str(file)},
                      programs={"two_hop": lambda: multihop.TwoHopQA(k=k, retriever=retriever),
                                "one_hop": lambda: multihop.OneHopQA(k=k, retriever=retriever)},
                      rubric=multihop.rubric,
                      gold_metric=Rubric([ExactMatch("answer", normalize=True, name="correct")], name="hotpot_gold"))
