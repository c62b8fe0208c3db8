"""Every registered task: deterministic, disjoint splits; a rubric that scores gold 1.0 and a wrong answer lower;
programs that build; and clear errors for unknown names and options. Fast (no model)."""

from __future__ import annotations

import pickle

import dspy
import pytest

from metrics import Rubric
from programs.registry import (
    Task,
    TaskError,
    TaskOptionError,
    UnknownProgramError,
    UnknownTaskError,
    get_task,
    list_tasks,
    register_task,
    task_from_spec,
)
from programs.tasks.splits import SplitError, split_of, take

BUILTIN = ["last_digit", "last_digit_long", "rg_basic_arithmetic", "rg_chain_sum", "rg_letter_counting",
           "rg_spell_backward", "gsm", "multihop", "react_tools"]


def _key(example: dspy.Example) -> str:
    return example.get("id") or example.question


def gold_prediction(task_name: str, example: dspy.Example) -> dspy.Prediction:
    """What a perfect program run returns for ``example`` (per task: answer plus what the rubric inspects)."""
    fields = {"answer": example.answer}
    if task_name == "multihop":
        fields["retrieved_ids"] = list(example.gold_ids)
    if task_name == "react_tools":
        trajectory = {}
        for i, call in enumerate([*example.gold_calls, {"tool": "finish", "args": {}}]):
            trajectory.update({f"thought_{i}": "...", f"tool_name_{i}": call["tool"], f"tool_args_{i}": call["args"],
                               f"observation_{i}": "ok"})
        fields["trajectory"] = trajectory
    return dspy.Prediction(**fields)


def test_builtins_are_registered():
    assert set(BUILTIN) | {"file", "gsm8k_file", "hotpotqa_file"} <= set(list_tasks())


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_are_deterministic_and_disjoint(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name and task.description
    first = task.splits(24, 8, 8, seed=0)
    again = task.splits(24, 8, 8, seed=0)
    other_seed = task.splits(24, 8, 8, seed=1)
    for split in ("train", "val", "test"):
        assert [e.toDict() for e in first[split]] == [e.toDict() for e in again[split]]
        assert len({_key(e) for e in first[split]}) == len(first[split])  # no duplicates
    keys = {s: {_key(e) for e in first[s] + other_seed[s]} for s in first}  # disjoint whatever the seed
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert [e.toDict() for e in other_seed["train"]] != [e.toDict() for e in first["train"]]
    # a bigger request starts with other examples but never crosses splits
    bigger = {_key(e) for e in task.load("train", 48, seed=0)}
    assert not bigger & keys["val"]
    for e in first["train"]:
        assert set(e.inputs().keys()) == {"question"}


@pytest.mark.parametrize("name", BUILTIN)
def test_rubric_scores_gold_one_and_wrong_lower(name):
    task = get_task(name)
    rubric = task.rubric()
    assert isinstance(rubric, Rubric)
    for example in task.load("val", 5, seed=0):
        gold = gold_prediction(name, example)
        assert rubric(example, gold).value == 1.0, rubric(example, gold).feedback
        wrong = dspy.Prediction(**{**gold.toDict(), "answer": "9999 wrong"})
        assert rubric(example, wrong).value < 1.0
        assert rubric(example, dspy.Prediction()).value < rubric(example, wrong).value or name == "react_tools"
        if task.gold_metric is not None:
            assert float(task.gold_metric(example, gold)) == 1.0
            assert float(task.gold_metric(example, wrong)) == 0.0
    pickle.loads(pickle.dumps(rubric))  # rubrics cross process boundaries


@pytest.mark.parametrize("name", BUILTIN)
def test_programs_build(name):
    task = get_task(name)
    for program_name in task.programs:
        program = task.program(program_name)
        assert isinstance(program, dspy.Module) and program.named_predictors()
    assert task.program() is not task.program()  # fresh instances


def test_multi_predictor_programs_have_distinct_predictors():
    names = [n for n, _ in get_task("multihop").program().named_predictors()]
    assert names == ["first_query", "second_query", "answer.predict"]
    assert [n for n, _ in get_task("react_tools").program().named_predictors()] == ["react", "extract.predict"]


def test_last_digit_task_reproduces_the_module_loader():
    from programs.tasks import last_digit

    assert [e.toDict() for e in get_task("last_digit").load("train", 20, 3)] == \
        [e.toDict() for e in last_digit.load("train", 20, 3)]
    long = get_task("last_digit_long").load("test", 20)
    assert all(len(str(e.number)) >= last_digit.LONG_DIGITS for e in long)


def test_difficulty_options_reach_the_generators():
    easy = get_task("rg_chain_sum", max_terms=2, max_digits=1).load("train", 10)
    assert all(e.question.count("+") + e.question.count("-") == 1 for e in easy)
    hard = get_task("rg_chain_sum", min_terms=5, max_terms=5).load("train", 5)
    assert all(e.question.count("+") + e.question.count("-") >= 4 for e in hard)
    assert get_task("last_digit", min_digits=3, max_digits=3).load("val", 5)[0].number < 1000


# --- bad input ----------------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UnknownTaskError, match=r"unknown task 'gsm9k'.*gsm8k_file.*last_digit.*multihop"):
        get_task("gsm9k")
    with pytest.raises(KeyError):  # also a KeyError, for callers that treat the registry as a mapping
        get_task("nope")


def test_unknown_options_are_named():
    with pytest.raises(TaskOptionError, match=r"does not accept options \['kk'\].*\['k', 'kinds'\]"):
        get_task("multihop", kk=2)
    with pytest.raises(TaskOptionError, match=r"no options \['max_word'\].*max_words"):
        get_task("rg_letter_counting", max_word=3)
    with pytest.raises(TaskOptionError, match="invalid options"):
        get_task("rg_chain_sum", min_terms=4, max_terms=2)
    with pytest.raises(TaskOptionError, match="kinds must be a non-empty subset"):
        get_task("react_tools", kinds=["poetry"])


def test_unknown_program_and_bad_split():
    task = get_task("last_digit")
    with pytest.raises(UnknownProgramError, match=r"no program 'react'.*\['cot', 'predict'\]"):
        task.program("react")
    with pytest.raises(SplitError, match="unknown split 'dev'"):
        task.load("dev", 3)
    with pytest.raises(SplitError, match="n must be"):
        task.load("train", -1)
    with pytest.raises(SplitError, match="holds only"):
        get_task("multihop", kinds=["company_city"]).load("test", 10_000)
    with pytest.raises(SplitError, match="only about"):
        get_task("last_digit", min_digits=1, max_digits=1).load("val", 5)


def test_register_and_spec():
    base = get_task("last_digit")
    register_task("my_digits", lambda min_digits=3: get_task("last_digit", min_digits=min_digits))
    try:
        assert task_from_spec({"name": "my_digits", "options": {"min_digits": 4}}).options["min_digits"] == 4
        assert task_from_spec("my_digits").load("train", 2) == base.load("train", 2)
        with pytest.raises(TaskError, match="already registered"):
            register_task("my_digits", base)
        register_task("my_digits", base, replace=True)
        assert get_task("my_digits") is base
    finally:
        from programs import registry

        registry._REGISTRY.pop("my_digits", None)
    with pytest.raises(TaskError, match="unknown keys \\['option'\\]"):
        task_from_spec({"name": "gsm", "option": {}})
    with pytest.raises(TaskError, match="identifiers"):
        register_task("my task!", base)


def test_split_helpers():
    assert split_of("x", ratios=(1, 0, 0)) == "train" and split_of("x", ratios=(0, 0, 1)) == "test"
    with pytest.raises(SplitError, match="summing to 1"):
        split_of("x", ratios=(0.5, 0.2, 0.2))
    items = [f"item{i}" for i in range(200)]
    parts = {s: set(take(items, s, None, key=str)) for s in ("train", "val", "test")}
    assert sum(map(len, parts.values())) == 200 and not parts["train"] & parts["val"]
    assert 130 < len(parts["train"]) < 190  # about 80%
    salted = set(take(items, "train", None, key=str, salt="other"))
    assert salted != parts["train"]
