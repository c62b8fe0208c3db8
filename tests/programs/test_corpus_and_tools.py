"""The bundled corpus (reproducible, small, BM25-indexed offline) and the agent's tools (safe, clear errors)."""

from __future__ import annotations

import time

import pytest

from programs.tasks import tools, world
from programs.tasks.corpus import CorpusError, Passage, Retriever, default_retriever, read_jsonl
from programs.tasks.tools import ToolError, calculator, convert_units


def test_shipped_corpus_is_what_the_generator_writes():
    built = world.build()
    for name, rows in zip(world.FILES, (built.passages, built.multihop, built.tools), strict=True):
        shipped = (world.CORPUS_DIR / name).read_text(encoding="utf-8")
        assert shipped == world.dumps(rows), f"{name} is stale: run `python -m programs.tasks.world`"
    assert sum((world.CORPUS_DIR / n).stat().st_size for n in world.FILES) < 2 * 1024 * 1024
    assert 500 <= len(built.passages) <= 3000
    titles = [p["title"] for p in built.passages]
    assert len(set(titles)) == len(titles)


def test_index_builds_offline_quickly_and_finds_every_gold_passage():
    t0 = time.perf_counter()
    retriever = Retriever([Passage(r["id"], r["title"], r["text"]) for r in read_jsonl("passages.jsonl")])
    build_seconds = time.perf_counter() - t0
    print(f"BM25 index over {len(retriever)} passages built in {build_seconds:.2f} s")  # reported, not asserted
    questions = read_jsonl("multihop.jsonl")
    for q in questions[::7]:
        for gold_id, query in zip(q["gold_ids"], q["gold_queries"], strict=True):
            assert gold_id in [p.id for p in retriever.search(query, k=3)], (query, gold_id)


def test_fixture_retrieval_top_k():
    passages = [Passage("a", "Vialem Industries", "Vialem Industries is based in Trushitheix."),
                Passage("b", "Trushitheix", "Trushitheix is a city in Moflisia on the Vudrei river."),
                Passage("c", "Logrus Trading", "Logrus Trading is based in Gowel.")]
    retriever = Retriever(passages)
    assert retriever.search("Vialem Industries", k=1)[0].id == "a"
    assert "b" in [p.id for p in retriever.search("Which river flows through Trushitheix?", k=2)]
    assert retriever.search("zzz qqq", k=2) == [] and retriever.search("", k=2) == []
    assert retriever.lookup("logrus trading").id == "c" and retriever.lookup("Logrus").id == "c"
    with pytest.raises(ValueError, match="k must be >= 1"):
        retriever.search("Gowel", k=0)


def test_retriever_is_shared_by_program_copies():
    import copy

    from programs.tasks.multihop import TwoHopQA

    program = TwoHopQA(retriever=default_retriever())
    assert copy.deepcopy(program).retriever is program.retriever is default_retriever()


def test_missing_corpus_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="python -m programs.tasks.world"):
        read_jsonl("passages.jsonl", directory=tmp_path)


@pytest.mark.parametrize("expression, value", [
    ("1966 - 1932", "34"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("2 ** 10", "1024"), ("2^3", "8"),
    ("-3 + 10 % 4", "-1"), ("10 // 3", "3"), ("0.1 + 0.2", "0.3"),
])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('ls')", "unsupported syntax Call"),
    ("open('/etc/passwd')", "unsupported syntax Call"),
    ("x + 1", "unsupported syntax Name"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "exponent too large"),
    ("10 ** 19", "out of range"),
    ("1e10 ** 40", "out of range"),  # a float overflow: OverflowError escaped the tool (issue 32)
    ("(-8) ** 0.5", "not a real number"),  # complex: was refused as "magnitude above 1e+18"
    ("two plus two", "cannot parse"),
    ("1966or 2", "cannot parse"),  # a SyntaxWarning to Python's tokenizer: refused before it prints one
    ("3in (4,)", "cannot parse"),
    ("", "empty expression"),
    ("1 +" * 100, "longer than"),
    ("[1, 2]", "unsupported syntax List"),
    ("True + 1", "unsupported syntax Constant"),
])
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)


def test_calculator_prints_no_syntax_warning_for_a_number_run_into_a_keyword():
    """Python's tokenizer warns (SyntaxWarning) on "1966or 2" instead of failing: rollouts write such expressions."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for expression in ("1966or 2", "1986 - 1986if 1 else 0", "3in (4,)"):
            with pytest.raises(ToolError, match="cannot parse"):
                calculator(expression)
    assert not [w for w in caught if issubclass(w.category, SyntaxWarning)], [str(w.message) for w in caught]


def test_unit_conversion():
    assert convert_units(1, "km", "m") == "1000"
    assert convert_units(100, "meters", "feet") == "328.084"
    assert convert_units(100, "C", "F") == "212"
    assert convert_units("2", "lb", "oz") == "32"
    with pytest.raises(ToolError, match="cannot convert length"):
        convert_units(1, "m", "kg")
    with pytest.raises(ToolError, match="unknown unit 'parsec'"):
        convert_units(1, "parsec", "m")
    with pytest.raises(ToolError, match="must be a number"):
        convert_units("tall", "m", "ft")


def test_lookup_tool_and_gold_calls_reproduce_every_tool_answer():
    from metrics import NumericMatch

    by_name = {t.name: t for t in tools.make_tools()}
    assert set(by_name) == {"lookup", "calculator", "convert_units"}
    assert by_name["lookup"](name="Vialem Industries").startswith("Vialem Industries is a textile company")
    with pytest.raises(ToolError):
        by_name["lookup"](name=" ")
    check = NumericMatch("answer", rel_tol=0.01)
    for row in read_jsonl("tools.jsonl")[::5]:
        observations = [by_name[c["tool"]](**c["args"]) for c in row["gold_calls"]]
        for call, seen in zip(row["gold_calls"][:-1], observations[:-1], strict=True):
            assert str(call["args"].get("name", "")) in seen  # each lookup found its entity
        assert check({"answer": row["answer"]}, {"answer": observations[-1]}).value == 1.0, row
