"""Bring-your-own data: local JSONL/CSV/parquet through ``datasets``, field mapping, recipes, clear errors."""

from __future__ import annotations

import json

import dspy
import pytest

from programs.data import DataFileError, FieldMappingError, from_file, gsm8k, hotpotqa, read_records
from programs.registry import TaskOptionError, get_task
from programs.tasks.corpus import read_jsonl

ROWS = [{"q": f"What is {i} plus {i + 1}?", "a": str(2 * i + 1), "uid": f"row{i}"} for i in range(60)]


@pytest.fixture()
def qa_files(tmp_path):
    """The same 60 rows as JSONL, CSV and parquet."""
    import datasets

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    csv = tmp_path / "qa.csv"
    csv.write_text("q,a,uid\n" + "".join(f"\"{r['q']}\",{r['a']},{r['uid']}\n" for r in ROWS))
    parquet = tmp_path / "qa.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    return {"jsonl": jsonl, "csv": csv, "parquet": parquet, "cache": tmp_path / "hf-cache"}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_from_file_maps_fields_and_splits_deterministically(qa_files, kind):
    task = get_task("file", path=str(qa_files[kind]), field_map={"question": "q", "answer": "a"},
                    cache_dir=str(qa_files["cache"]))
    splits = task.splits(20, 4, 4, seed=0)
    assert splits == task.splits(20, 4, 4, seed=0)
    questions = {s: {e.question for e in splits[s]} for s in splits}
    assert not questions["train"] & questions["val"] and not questions["val"] & questions["test"]
    example = splits["train"][0]
    assert set(example.keys()) == {"question", "answer"} and set(example.inputs().keys()) == {"question"}
    assert str(example.answer) == str(2 * int(example.question.split()[2]) + 1)
    rubric = task.rubric()
    assert rubric(example, {"answer": str(example.answer)}).value == 1.0
    assert rubric(example, {"answer": "-5"}).value < 1.0
    assert set(task.programs) == {"predict", "cot"}
    assert str(task.program().signature).startswith("StringSignature(question -> answer")


def test_same_rows_give_the_same_splits_in_every_format(qa_files):
    def val(kind):
        task = from_file(str(qa_files[kind]), field_map={"question": "q", "answer": "a"},
                         cache_dir=str(qa_files["cache"]))
        return sorted(e.question for e in task.load("val", 4, seed=0))

    assert val("jsonl") == val("csv") == val("parquet")


def test_id_field_and_numeric_match(qa_files):
    task = from_file(str(qa_files["jsonl"]), field_map={"question": "q", "answer": "a", "uid": "uid"},
                     output_field="answer", id_field="uid", match="numeric", ratios=(0.5, 0.25, 0.25))
    example = task.load("test", 3)[0]
    assert task.rubric()(example, {"answer": f"The sum is {example.answer}."}).value == 1.0
    assert task.options["ratios"] == [0.5, 0.25, 0.25]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataFileError, match=r"data file .*nope\.jsonl not found.*never downloads"):
        get_task("file", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        read_records(tmp_path / "nope.csv")
    with pytest.raises(DataFileError, match="GSM8K is not bundled.*grade-school-math"):
        get_task("gsm8k_file", path=str(tmp_path / "gsm8k" / "train.jsonl"))
    with pytest.raises(DataFileError, match="HotPotQA is not bundled.*hotpot_dev_distractor"):
        get_task("hotpotqa_file", path=str(tmp_path / "hotpot.json"))


def test_mapping_to_a_missing_column_names_it_and_the_columns(qa_files):
    with pytest.raises(FieldMappingError,
                       match=r"field 'answer' is mapped to column 'answer_text'.*\['q', 'a', 'uid'\]"):
        from_file(str(qa_files["jsonl"]), field_map={"question": "q", "answer": "answer_text"})
    with pytest.raises(FieldMappingError, match=r"input fields \['question'\] are not among the mapped fields"):
        from_file(str(qa_files["csv"]), field_map={"query": "q", "answer": "a"})
    with pytest.raises(FieldMappingError, match="id_field 'key'"):
        from_file(str(qa_files["jsonl"]), field_map={"question": "q", "answer": "a"}, id_field="key")
    with pytest.raises(KeyError):  # also a KeyError
        from_file(str(qa_files["parquet"]), field_map={"question": "question", "answer": "a"})


def test_bad_files_and_options(tmp_path, qa_files):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFileError, match="cannot tell the format"):
        from_file(str(tmp_path / "notes.txt"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "a", "a": 1}\n{not json\n')
    with pytest.raises(DataFileError, match="could not read"):
        from_file(str(broken))
    holes = tmp_path / "holes.jsonl"
    holes.write_text('{"q": "a?", "a": "1"}\n{"q": "b?", "a": null}\n')
    with pytest.raises(DataFileError, match=r"row 1 of holes.jsonl has no value for \['answer'\]"):
        from_file(str(holes), field_map={"question": "q", "answer": "a"})
    with pytest.raises(TaskOptionError, match="match must be one of"):
        from_file(str(qa_files["jsonl"]), match="fuzzy")


def test_gsm8k_recipe(tmp_path):
    rows = [{"question": f"Tom has {i} apples and buys {i} more. How many now?",
             "answer": f"He has {i} + {i} = {2 * i} apples.\n#### {2 * i:,}"} for i in range(500, 540)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("gsm8k_file", path=str(path), ratios=(0.5, 0.5, 0))
    example = task.load("train", 3)[0]
    n = int(example.question.split()[2])
    assert example.answer == str(2 * n) and example.rationale.endswith(f"= {2 * n} apples.")
    assert task.default_program == "cot" and task.rubric()(example, {"answer": f"{2 * n}"}).value == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(DataFileError, match="no '#### <number>' line"):
        gsm8k(str(bad))


def hotpot_records(n: int = 40) -> list[dict]:
    """HotPotQA-format records built from the bundled multi-hop questions (gold passages + distractors)."""
    passages = {r["id"]: r for r in read_jsonl("passages.jsonl")}
    out = []
    for i, q in enumerate(read_jsonl("multihop.jsonl")[:n]):
        distractors = [f"p{(i * 13 + j) % 600:04d}" for j in (1, 2)]
        context = [[passages[p]["title"], [passages[p]["text"]]] for p in q["gold_ids"] + distractors]
        out.append({"_id": q["id"], "question": q["question"], "answer": q["answer"], "context": context,
                    "supporting_facts": [[passages[p]["title"], 0] for p in q["gold_ids"]], "type": "bridge"})
    return out


def test_hotpotqa_recipe_official_json_and_hf_parquet(tmp_path):
    import datasets

    records = hotpot_records()
    official = tmp_path / "hotpot_dev_distractor_v1.json"
    official.write_text(json.dumps(records))
    hf = tmp_path / "validation.parquet"
    datasets.Dataset.from_list([{**r, "id": r["_id"], "context": {"title": [c[0] for c in r["context"]],
                                 "sentences": [c[1] for c in r["context"]]},
                                 "supporting_facts": {"title": [f[0] for f in r["supporting_facts"]],
                                                      "sent_id": [f[1] for f in r["supporting_facts"]]}}
                                for r in records]).remove_columns("_id").to_parquet(str(hf))
    for path in (official, hf):
        task = hotpotqa(str(path), k=2, ratios=(0.5, 0.5, 0))
        example = task.load("val", 4)[0]
        program = task.program()
        titles = [p.title for p in program.retriever.search(example.question, k=4)]
        assert set(example.gold_ids) & set(titles)
        gold = {"answer": example.answer, "retrieved_ids": example.gold_ids}
        assert task.rubric()(example, gold).value == 1.0
        assert [n for n, _ in program.named_predictors()] == ["first_query", "second_query", "answer.predict"]
    assert [e.toDict() for e in hotpotqa(str(official), ratios=(0.5, 0.5, 0)).load("train", 5)] == \
        [e.toDict() for e in hotpotqa(str(hf), ratios=(0.5, 0.5, 0)).load("train", 5)]
    missing = tmp_path / "other.json"
    missing.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(FieldMappingError, match="column 'context'"):
        hotpotqa(str(missing))


def test_example_inputs_are_marked(qa_files):
    task = from_file(str(qa_files["jsonl"]), input_fields=["question", "uid"],
                     field_map={"question": "q", "uid": "uid", "answer": "a"})
    example = task.load("train", 1)[0]
    assert isinstance(example, dspy.Example) and set(example.inputs().keys()) == {"question", "uid"}
    assert "question, uid -> answer" in str(task.program().signature)
