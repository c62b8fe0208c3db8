"""Tests for metrics.calibration: rubric weights fitted to labels that reject what one component rewards.

The case: arithmetic answers scored by correctness (the number in the answer), format (an answer at all) and a
``length`` component that rewards long answers. Reviewers pass short correct answers and fail long ones, so the
calibrated rubric must drop ``length`` and agree better with held-out labels than the hand-set weights. LM judges
and the criteria proposer are scripted with ``DummyLM``; no model runs.
"""

import json

import dspy
import numpy as np
import pytest
from dspy.utils import DummyLM

from metrics import Custom, FormatValidity, GoldGuard, LMJudge, NumericMatch, Rubric
from metrics.calibration import (
    FORMAT_VERSION,
    CalibrationFileError,
    ComponentMismatchError,
    Label,
    LabelError,
    NotEnoughLabelsError,
    SingleClassError,
    UnlabelledExampleError,
    agreement,
    calibrate,
    calibrate_with_candidates,
    corrected_examples,
    labels_as_gold,
    load_calibrated,
    propose_criteria,
)

FILLER = "After careful thought about the question and every step of the sum, the answer is "


def length(example, pred, trace=None):
    """Rewards long answers: the loophole the labels reject."""
    return min(1.0, len(str(pred.get("answer") or "")) / 60)


def base_rubric(with_length=True):
    comps = [NumericMatch("answer", name="correct"), FormatValidity(["answer"])]
    if with_length:
        comps.append(Custom(length, name="length"))
    return Rubric(comps, name="arith")


def rollouts(n=60, seed=0):
    """(example, prediction, passed) triples: 30% right+short, 30% right+long, 25% wrong+short, 15% wrong+long/empty."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        ex = dspy.Example(id=f"q{i}", question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question")
        kind = i % 20
        right = a + b if kind < 12 else a + b + 1
        long_ = 6 <= kind < 12 or kind >= 17
        text = (FILLER * int(rng.integers(1, 3)) + str(right)) if long_ else str(right)
        if kind == 19:
            text = ""
        out.append((ex, dspy.Prediction(answer=text), kind < 6))
    return out


def make_labels(rubric, data, source="HUMAN"):
    return [Label(f"tr-{i}", rubric(ex, pred).components, passed, source=source, example=ex, prediction=pred)
            for i, (ex, pred, passed) in enumerate(data)]


@pytest.fixture(scope="module")
def case():
    rubric = base_rubric()
    data = rollouts()
    labels = make_labels(rubric, data)
    return rubric, data, labels, calibrate(rubric, labels, seed=0)


def test_length_rejected_by_labels_falls_to_zero_and_heldout_agreement_rises(case):
    rubric, _, _, cal = case
    assert cal.old_weights["length"] > 0
    assert cal.weights["length"] <= 0.0
    assert cal.weights["correct"] > 0
    assert cal.after.concordance > cal.before.concordance
    assert cal.after.accuracy >= cal.before.accuracy  # no component can tell short from long right answers
    assert cal.to_rubric().effective_weights["length"] == 0.0
    assert "length" in cal.summary() and "held-out concordance" in cal.summary()


def test_agreement_is_measured_on_labels_the_fit_did_not_see(case):
    rubric, data, labels, cal = case
    assert set(cal.fit_ids).isdisjoint(cal.heldout_ids)
    assert set(cal.fit_ids) | set(cal.heldout_ids) == {lab.id for lab in labels}
    assert cal.n_fit == len(cal.fit_ids) and cal.n_heldout == cal.after.n == cal.before.n == len(cal.heldout_ids)
    assert 0.2 * len(labels) <= cal.n_heldout <= 0.4 * len(labels)
    # the reported agreement is what the calibrated (and the original) rubric really scores on the held-out rollouts
    by_id = {lab.id: (lab, ex, pred) for lab, (ex, pred, _) in zip(labels, data)}
    held = [by_id[i] for i in cal.heldout_ids]
    new, old = cal.to_rubric(), rubric
    after = agreement([new(ex, pred).value for _, ex, pred in held], [lab for lab, _, _ in held], cal.threshold)
    before = agreement([old(ex, pred).value for _, ex, pred in held], [lab for lab, _, _ in held])
    assert after.concordance == pytest.approx(cal.after.concordance)
    assert after.accuracy == pytest.approx(cal.after.accuracy)
    assert before.concordance == pytest.approx(cal.before.concordance)


def test_deterministic_given_seed_and_seeds_change_the_split(case):
    rubric, _, labels, cal = case
    again = calibrate(rubric, labels, seed=0)
    assert (again.weights, again.heldout_ids, again.after) == (cal.weights, cal.heldout_ids, cal.after)
    other = calibrate(rubric, labels, seed=1)
    assert set(other.heldout_ids) != set(cal.heldout_ids)
    assert other.weights["length"] <= 0.0


def test_explicit_holdout_ids(case):
    rubric, _, labels, _ = case
    held = [lab.id for lab in labels[::4]]
    cal = calibrate(rubric, labels, holdout=held)
    assert set(cal.heldout_ids) == set(held) and cal.n_fit == len(labels) - len(held)


def test_save_load_round_trip(case, tmp_path):
    rubric, data, _, cal = case
    path = cal.save(tmp_path / "calibrated" / "arith.json")
    data_file = json.loads(path.read_text())
    assert data_file["version"] == FORMAT_VERSION and data_file["rubric"] == "arith"
    assert data_file["components"] == ["correct", "format", "length"]
    ev = data_file["evidence"]
    assert ev["labels"] == {"fit": cal.n_fit, "heldout": cal.n_heldout, "sources": {"HUMAN": 60, "GOLD": 0}}
    assert ev["after"]["concordance"] > ev["before"]["concordance"] and ev["seed"] == 0
    assert data_file["created"][:4].isdigit()
    loaded = load_calibrated(path, base_rubric())
    assert loaded.effective_weights == pytest.approx(cal.to_rubric().effective_weights)
    assert loaded.gates == cal.gates and loaded.name == "arith"
    ex, pred, _ = data[7]
    assert loaded(ex, pred).value == pytest.approx(cal.to_rubric()(ex, pred).value)


def test_mismatched_components_and_bad_files_are_refused(case, tmp_path):
    _, _, _, cal = case
    path = cal.save(tmp_path / "r.json")
    with pytest.raises(ComponentMismatchError, match=r"missing: \['length'\].*calibrate\(\) again"):
        load_calibrated(path, base_rubric(with_length=False))
    other = Rubric([NumericMatch("answer", name="correct"), FormatValidity(["answer"]), Custom(length, name="size")])
    with pytest.raises(ComponentMismatchError, match="size"):
        load_calibrated(path, other)
    with pytest.raises(ComponentMismatchError):
        cal.to_rubric(other)
    bad = json.loads(path.read_text())
    bad["version"] = FORMAT_VERSION + 1
    (tmp_path / "v.json").write_text(json.dumps(bad))
    with pytest.raises(CalibrationFileError, match="version"):
        load_calibrated(tmp_path / "v.json", base_rubric())
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CalibrationFileError):
        load_calibrated(tmp_path / "x.json", base_rubric())


def test_too_few_one_class_and_malformed_labels_are_refused(case):
    rubric, _, labels, _ = case
    with pytest.raises(NotEnoughLabelsError, match="at least 10"):
        calibrate(rubric, labels[:5])
    passes = [lab for lab in labels if lab.passed]
    with pytest.raises(SingleClassError, match="all 18 labels are passes"):
        calibrate(rubric, passes)
    few_fails = passes + [lab for lab in labels if not lab.passed][:2]
    with pytest.raises(NotEnoughLabelsError, match="rarer verdict"):
        calibrate(rubric, few_fails)
    short = [Label(lab.id, {"correct": 1.0}, lab.value) for lab in labels]
    with pytest.raises(ComponentMismatchError, match="Score.components"):
        calibrate(rubric, short)
    with pytest.raises(LabelError, match="HUMAN or GOLD"):
        Label("t", {}, True, source="CODE")
    with pytest.raises(LabelError, match="in \\[0, 1\\]"):
        Label("t", {}, 3)
    with pytest.raises(LabelError, match="component 'x'"):
        Label("t", {"x": 1.5}, True)
    assert Label("t", {}, "Fail").value == 0.0 and Label("t", {}, "0.75").passed


def test_gold_labels_count_as_labels():
    rubric = base_rubric()
    data = rollouts(40, seed=3)
    gold = make_labels(rubric, data[20:])
    labels = make_labels(rubric, data[:20]) + [Label(f"g{i}", lab.components, lab.value, source="GOLD")
                                               for i, lab in enumerate(gold)]
    cal = calibrate(rubric, labels, seed=2)
    assert cal.sources == {"HUMAN": 20, "GOLD": 20} and cal.weights["length"] == 0.0


# ------------------------------------------------------------------------------------------- proposed criteria
def judge_lm(long_score, short_score):
    """A judge that scores answers containing the filler text (long ones) ``long_score``, others ``short_score``."""
    return DummyLM({"careful thought": {"justification": "long", "score": long_score},
                    "[[ ## response ## ]]": {"justification": "short", "score": short_score}})


def test_proposer_keeps_a_helpful_criterion_and_drops_a_useless_one():
    rubric = base_rubric(with_length=False)  # nothing in it sees length: weights alone cannot fix it
    labels = make_labels(rubric, rollouts())
    proposer = DummyLM([{"criteria": [
        {"name": "Mentions units", "criterion": "The answer names its units."},
        {"name": "Concise", "criterion": "The answer is the number alone, without explanation."}]}])
    candidates = propose_criteria("Add two numbers.", labels, proposer, n=2, existing=rubric)
    assert [c.name for c in candidates] == ["mentions_units", "concise"]
    prompt = proposer.history[-1]["messages"][-1]["content"]
    assert "FAIL" in prompt and "PASS" in prompt and "What is" in prompt and "correct" in prompt
    candidates[0].lm = judge_lm("0.5", "0.5")  # useless: the same score for every answer
    candidates[1].lm = judge_lm("0", "1")      # helpful: what the reviewers judge
    cal = calibrate_with_candidates(rubric, labels, candidates, seed=0)
    assert cal.candidates["concise"].kept and not cal.candidates["mentions_units"].kept
    assert cal.candidates["concise"].with_it > cal.candidates["concise"].without
    assert cal.names == ("correct", "format", "concise") and cal.weights["concise"] > 0
    assert cal.after.concordance > cal.before.concordance
    new = cal.to_rubric()
    assert new.names == ("correct", "format", "concise")
    ex, pred, _ = rollouts()[0]
    assert new(ex, pred).components["concise"] == 1.0


def test_added_criteria_survive_save_and_load(tmp_path):
    rubric = base_rubric(with_length=False)
    labels = make_labels(rubric, rollouts())
    concise = LMJudge("The answer is the number alone.", lm=judge_lm("0", "1"), name="concise")
    cal = calibrate_with_candidates(rubric, labels, [concise], seed=1)
    path = cal.save(tmp_path / "c.json")
    loaded = load_calibrated(path, base_rubric(with_length=False), judge_lm=judge_lm("0", "1"))
    assert loaded.names == ("correct", "format", "concise")
    assert loaded.components["concise"].criterion == "The answer is the number alone."
    assert loaded.effective_weights == pytest.approx(cal.to_rubric().effective_weights)


def test_candidates_need_rollouts_and_new_names(case):
    rubric, _, labels, _ = case
    bare = [Label(lab.id, lab.components, lab.value) for lab in labels]
    with pytest.raises(LabelError, match="example= and prediction="):
        calibrate_with_candidates(rubric, bare, [LMJudge("x", lm=judge_lm("0", "1"), name="c")])
    with pytest.raises(ComponentMismatchError, match="unique new name"):
        calibrate_with_candidates(rubric, labels, [LMJudge("x", name="length")])


# ------------------------------------------------------------------------------------------- gold and corrections
def test_human_labels_serve_as_the_gold_guards_metric():
    q1 = dspy.Example(id="q1", question="Capital of France?").with_inputs("question")
    q2 = dspy.Example(id="q2", question="Capital of Italy?").with_inputs("question")
    labels = [
        Label("t1", {}, "pass", example=q1, prediction={"answer": "Paris"}),
        Label("t2", {}, "fail", example=q1, prediction={"answer": "Paris, obviously, as everyone knows"}),
        Label("t3", {}, "fail", example=q2, prediction={"answer": "Milan"}, corrected="Rome"),
    ]
    gold = labels_as_gold(labels)
    assert gold(q1, {"answer": "paris"}) == 1.0
    assert gold(q1, {"answer": "Paris, obviously, as everyone knows"}) == 0.0
    assert gold(q1, {"answer": "Lyon"}) == 0.0  # q1 has an accepted answer and this is not it
    assert (gold(q2, {"answer": "Rome"}), gold(q2, {"answer": "Milan"})) == (1.0, 0.0)
    with pytest.raises(UnlabelledExampleError, match="q3"):
        gold({"id": "q3"}, {"answer": "Madrid"})
    assert labels_as_gold(labels, default=0.5)({"id": "q3"}, {"answer": "Madrid"}) == 0.5
    guard = GoldGuard(gold, tolerance=0.0)
    short = [(q1, {"answer": "Paris"}), (q2, {"answer": "Rome"})]
    rambling = [(q1, {"answer": "Paris, obviously, as everyone knows"}), (q2, {"answer": "Rome"})]
    guard.check("p", reward=0.6, gold=float(np.mean([guard.gold_score(e, p) for e, p in short])))
    with pytest.warns(UserWarning, match="reward hacking"):
        event = guard.check("w", reward=0.9, gold=float(np.mean([guard.gold_score(e, p) for e, p in rambling])))
    assert event.kind == "gold_divergence"


def test_corrected_answers_become_examples_with_provenance():
    ex = dspy.Example(id="q7", question="What is 2 + 2?", answer="5").with_inputs("question")
    labels = [
        Label("tr-1", {}, "fail", rationale="off by one", corrected="4", example=ex),
        Label("tr-2", {}, "pass", example=ex),  # nothing corrected: no example
        Label("tr-3", {}, 0.2, source="GOLD", corrected={"answer": "4", "reasoning": "2 + 2 = 4"},
              example={"question": "What is 2 + 2?"}),
    ]
    with pytest.raises(LabelError, match="input_keys"):
        corrected_examples(labels)
    out = corrected_examples(labels[:2]) + corrected_examples(labels[2:], input_keys=["question"])
    assert len(out) == 2
    first, second = out
    assert first.answer == "4" and first.id == "q7" and list(first.inputs().keys()) == ["question"]
    assert first.provenance == {"source": "HUMAN", "label_id": "tr-1", "rationale": "off by one", "verdict": 0.0}
    assert second.reasoning == "2 + 2 = 4" and second.provenance["source"] == "GOLD"
    with pytest.raises(LabelError, match="no example"):
        corrected_examples([Label("tr-4", {}, "fail", corrected="4")])


def test_a_gate_is_added_where_it_raises_agreement_and_the_rubric_applies_it():
    """Reviewers pass only exact answers (a == 1) with enough support (b >= 0.5); near misses (a = 0.9) with full
    support outscore them under a weighted sum, and gating b on a fixes that."""
    rng = np.random.default_rng(0)
    rubric = Rubric([Custom(lambda e, p: p["a"], name="a"), Custom(lambda e, p: p["b"], name="b")], name="ab")
    preds = [{"a": float(rng.choice([0.0, 0.8, 0.9, 1.0])), "b": float(rng.choice([0.0, 0.5, 1.0]))} for _ in range(80)]
    labels = [Label(f"t{i}", rubric({}, p).components, p["a"] == 1.0 and p["b"] >= 0.5, example={}, prediction=p)
              for i, p in enumerate(preds)]
    cal = calibrate(rubric, labels, seed=0)
    assert cal.gates == {"b": ("a", 1.0)} and cal.old_gates == {}
    assert cal.after.concordance > cal.before.concordance
    new = cal.to_rubric()
    assert new.gates == {"b": ("a", 1.0)} and new({}, {"a": 0.9, "b": 1.0}).components["b"] == 0.0
    held = [lab for lab in labels if lab.id in set(cal.heldout_ids)]
    assert agreement([new({}, lab.prediction).value for lab in held], held, cal.threshold) == cal.after
    assert calibrate(rubric, labels, seed=0, fit_gates=False).gates == {}


def test_unnormalized_rubrics_and_mlflow_sources(case):
    _, _, labels, _ = case
    from mlflow.entities import AssessmentSource

    rubric = Rubric([NumericMatch("answer", name="correct"), FormatValidity(["answer"]), Custom(length, name="length")],
                    weights={"correct": 0.5, "format": 0.2, "length": 0.3}, normalize=False, name="arith")
    cal = calibrate(rubric, labels, seed=4)
    new = cal.to_rubric()
    assert not new.normalize and sum(new.weights.values()) <= 1 + 1e-9 and new.weights["length"] == 0.0
    assert Label("t", {}, True, source=AssessmentSource(source_type="HUMAN", source_id="ann")).source == "HUMAN"
