"""``optimize()`` end to end on the embedded tiny model: stages, budget, evaluation, save / load / export, resume.

The task is ``last_digit``: the untuned program is right ~40% of the time at temperature 0, three demos make it
right ~100% (headroom for a prompt stage), and GRPO sharpens it too (headroom for a weight stage).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import dspy
import pytest
import torch
from dspy.utils import DummyLM

from metrics import as_rubric
from optimizers import (
    Budget,
    BudgetError,
    MetricError,
    OptimizeCallback,
    OptimizeError,
    OutputDirError,
    PromptBudgetError,
    export,
    optimize,
)
from optimizers.budget import Meter, fit_prompt_config
from optimizers.prompt_stage import PromptStageConfig
from programs.tasks import last_digit

SEED = 0
HELDOUT = 100  # test questions for held-out lifts
WEIGHTS = {"learning_rate": 1e-3, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}
PROMPT = {"num_candidate_programs": 2, "max_bootstrapped_demos": 3, "num_threads": 8}


def _bound_program() -> dspy.Module:
    program = last_digit.predict_program()
    program.set_lm(DummyLM([]))
    return program


def _data(n_train: int = 24, n_val: int = 24):
    return last_digit.load("train", n_train, seed=SEED), last_digit.load("val", n_val, seed=SEED)


def _heldout(program: dspy.Module, policy, n: int = HELDOUT) -> float:
    """Greedy accuracy on ``n`` test questions that no stage sees (val picks candidates and the best stage)."""
    return last_digit.measure(program, policy.lm(temperature=0.0, max_tokens=16, cache=False), n).accuracy


def _trained(adapter: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> bool:
    """True when the LoRA weights moved: ``lora_B`` starts at zero (``lora_A`` is random from the start)."""
    b = [k for k in adapter if "lora_B" in k]
    assert b, "no lora_B tensors in the adapter"
    return any(not torch.equal(adapter[k], initial[k]) for k in b)


def _run(policy, tmp_path=None, schedule="p -> w", budget=400, **kwargs):
    train, val = _data()
    return optimize(last_digit.predict_program(), train, val, metric=last_digit.correct, policy=policy,
                    schedule=schedule, prompt=kwargs.pop("prompt", PROMPT), weights=kwargs.pop("weights", WEIGHTS),
                    budget=budget, seed=SEED, output_dir=tmp_path, progress=False, eval_threads=8, **kwargs)


# --- bad input: each a clear error, before any model call ------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(schedule="p -> x"), OptimizeError, "unknown stage 'x'"),
    (dict(schedule="  "), OptimizeError, "schedule is empty"),
    (dict(schedule="p -> -> w"), OptimizeError, "step 2 .* is empty"),
    (dict(trainset=[]), OptimizeError, "trainset: the trainset is empty"),
    (dict(valset=None), OptimizeError, "valset is required"),
    (dict(valset=[]), OptimizeError, "valset is empty"),
    (dict(trainset=[dspy.Example(question="q", answer="1")]), OptimizeError, "no input fields"),
    (dict(metric="exact"), OptimizeError, "metric must be"),
    (dict(budget=10), BudgetError, "below one GRPO step of 16 rollouts"),
    (dict(budget=0), BudgetError, "positive integer"),
    (dict(budget={"rolouts": 5}), BudgetError, "unknown budget keys"),
    (dict(weights={"lr": 1e-3}), OptimizeError, "weights: unknown setting.*'lr'"),
    (dict(weights={"num_generations": 1}), OptimizeError, "num_generations .* must be >= 2"),
    (dict(prompt={"optimizer": "copro"}), OptimizeError, "unknown optimizer 'copro'"),
    (dict(resume=True), OptimizeError, "resume=True needs the output_dir"),
    (dict(program="bound"), OptimizeError, "predictor 'self' is bound to another LM"),
])
def test_bad_input_is_a_clear_error(tiny_policy, kwargs, error, match):
    train, val = _data(4, 4)
    args = dict(trainset=train, valset=val, metric=last_digit.correct, schedule="p -> w", budget=400)
    args.update(kwargs)
    version = tiny_policy.version
    with pytest.raises(error, match=match):
        program = _bound_program() if args.pop("program", None) == "bound" else last_digit.predict_program()
        optimize(program, args.pop("trainset"), args.pop("valset"), policy=tiny_policy,
                 weights=args.pop("weights", WEIGHTS), prompt=args.pop("prompt", PROMPT), progress=False, **args)
    assert tiny_policy.version == version


def test_output_dir_with_other_files_or_another_run_is_never_overwritten(tiny_policy, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a cotune run"):
        _run(tiny_policy, tmp_path, schedule="p")
    with pytest.raises(OutputDirError, match="not a cotune run"):
        _run(tiny_policy, tmp_path, schedule="p", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"status": "completed", "params_hash": "x", "finished": [0, 1]}))
    with pytest.raises(OutputDirError, match="already holds a run .*resume=True.*overwrite=True"):
        _run(tiny_policy, run_dir, schedule="p")
    with pytest.raises(OutputDirError, match="different settings"):
        _run(tiny_policy, run_dir, schedule="p", resume=True)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("bad", ["raises", "nan"])
def test_a_broken_metric_names_the_example_and_the_run_is_marked_failed(tiny_policy, tmp_path, bad):
    def metric(example, pred, trace=None):
        if bad == "raises":
            raise KeyError("answer_text")
        return float("nan")

    train, val = _data(4, 4)
    with pytest.raises(MetricError, match=r"(KeyError|nan).* on example \{question=") as info:
        optimize(last_digit.predict_program(), train, val, metric=metric, policy=tiny_policy, schedule="p",
                 prompt=PROMPT, output_dir=tmp_path / "run", progress=False)
    assert isinstance(info.value, ValueError)  # what the CLI reports in one line
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "failed" and state["error"]


# --- budget accounting -------------------------------------------------------------------------------------


def test_meter_counts_program_runs_and_refuses_past_the_limit(tiny_policy):
    meter = Meter(Budget(rollouts=3))
    program = last_digit.predict_program()
    meter.count_only_like(program)
    lm = meter.lm(tiny_policy, temperature=0.0, max_tokens=8, cache=False)
    with meter.metering(), dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        for ex in last_digit.load("val", 3, seed=SEED):
            program(**ex.inputs())
        from optimizers import BudgetExhausted

        with pytest.raises(BudgetExhausted, match="3 program executions"):
            program(**last_digit.load("val", 4, seed=SEED)[3].inputs())
        other = dspy.Predict("text -> summary")  # a different module (e.g. a proposer) is not a rollout
        with meter.paused():
            program(**last_digit.load("val", 1, seed=SEED)[0].inputs())  # evaluation: not charged
    assert (meter.spent.rollouts, meter.spent.lm_calls) == (3, 3)
    assert meter.exhausted and other is not None


def test_fit_prompt_config_sizes_each_optimizer_to_its_share():
    assert fit_prompt_config(PromptStageConfig("bootstrap_rs", num_candidate_programs=16), 200, 24, 24
                             ).num_candidate_programs == 3
    gepa = fit_prompt_config(PromptStageConfig("gepa"), 150, 24, 24)
    assert (gepa.auto, gepa.max_metric_calls) == (None, 150)
    assert fit_prompt_config(PromptStageConfig("mipro"), 200, 24, 24).num_trials == 5
    assert fit_prompt_config(PromptStageConfig("bootstrap_rs"), None, 24, 24) == PromptStageConfig("bootstrap_rs")


def test_a_prompt_share_that_buys_no_candidate_is_refused_before_anything_is_spent(fresh_policy):
    # 30 rollouts cannot score one candidate on the val subsample: refused up front, naming the smallest budget
    # (what happens at the budget wall mid-search: tests/optimizers/test_defaults.py keeps the best candidate)
    version = fresh_policy.version
    with pytest.raises(PromptBudgetError, match="smallest budget for p that buys it is 48 rollouts"):
        _run(fresh_policy, schedule="p", budget=30,
             prompt={"num_candidate_programs": 4, "max_bootstrapped_demos": 3, "num_threads": 1})
    assert fresh_policy.version == version


# --- end to end ---------------------------------------------------------------------------------------------


class Recorder(OptimizeCallback):
    def __init__(self):
        self.events = []

    def on_run_start(self, run):
        self.events.append(("start", run.arm))

    def on_stage_start(self, run, index, stage):
        self.events.append(("stage", index, stage))

    def on_step(self, run, index, metrics):
        self.events.append(("step", index, metrics["rollouts"]))

    def on_stage_end(self, run, record):
        self.events.append(("end", record.name))

    def on_run_end(self, run, result):
        self.events.append(("done", len(result.history)))


@pytest.mark.slow
def test_p_then_w_improves_on_the_untuned_program_within_budget(fresh_policy, tmp_path):
    untuned = _heldout(last_digit.predict_program(), fresh_policy)  # before any weight changes
    recorder = Recorder()
    result = _run(fresh_policy, tmp_path / "run", budget=400, callbacks=[recorder])
    names = [r.name for r in result.history]
    tuned = _heldout(result.program, fresh_policy)
    print("val per stage:", [(r.name, round(r.val_score, 3), r.total_spend) for r in result.history],
          f"held-out test: {untuned:.3f} -> {tuned:.3f}")
    assert names == ["0-baseline", "1-p", "2-w"]  # the baseline, then one entry per stage
    # the lift is measured on test questions no stage saw (val picked demos and the best stage)
    assert tuned >= untuned + 0.10, (untuned, tuned)
    assert result.best_index > 0 and result.val_score > result.history[0].val_score
    baseline = result.history[0].val_score
    assert result.spend["rollouts"] <= 400 and result.spend["rollouts"] == sum(r.spend["rollouts"] for r in result.history)
    p, w = result.history[1], result.history[2]
    assert not p.note, p.note  # the prompt optimizer finished inside its share
    assert w.details["steps"] >= 1 and w.adapter_version > p.adapter_version
    assert recorder.events[0] == ("start", "joint") and recorder.events[-1] == ("done", 3)
    assert [e for e in recorder.events if e[0] == "end"] == [("end", n) for n in names]
    assert sum(e[0] == "step" for e in recorder.events) == w.details["steps"]
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    for bundle in ("best", "last"):
        manifest = json.loads((run / bundle / "manifest.json").read_text())
        assert manifest["schedule"] == "p -> w" and manifest["val_scores"]["0-baseline"] == baseline
        assert (run / bundle / "adapter" / "adapter_model.safetensors").exists()
        assert manifest["base_fingerprint"] == fresh_policy.base_fingerprint and manifest["versions"]["dspy"]
    assert (run / "stages" / "2-w" / "predictions.jsonl").read_text().count("\n") == 24


@pytest.mark.slow
def test_saved_bundle_reloads_in_a_fresh_process_with_the_same_predictions(fresh_policy, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    initial = fresh_policy.adapter_state()
    result = _run(fresh_policy, tmp_path / "run", schedule="w", budget=320)
    best = result.history[result.best_index]
    print("val per stage:", [(r.name, r.val_score) for r in result.history])
    assert best.name == "1-w", "the weight stage did not beat the untuned program on val: nothing trained to reload"
    saved = load_file(tmp_path / "run" / "best" / "adapter" / "adapter_model.safetensors")
    assert _trained(saved, initial)
    val = last_digit.load("val", 24, seed=SEED)
    mine = [result.program(**ex.inputs()).answer for ex in val]
    bundle = result.save(tmp_path / "bundle")
    with pytest.raises(FileExistsError):
        result.save(tmp_path / "bundle")
    script = textwrap.dedent(f"""
        import json
        from optimizers import load
        from programs.tasks import last_digit
        program = load({str(bundle)!r}, program=last_digit.predict_program(), max_tokens=16)
        print(json.dumps([program(**ex.inputs()).answer for ex in last_digit.load("val", 24, seed=0)]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    assert theirs == mine  # example by example, not one aggregate score
    assert sum(a == ex.answer for a, ex in zip(theirs, val)) / len(val) == pytest.approx(best.val_score)


@pytest.mark.slow
def test_exported_adapter_loads_with_peft_and_merged_weights_give_the_same_logits(fresh_policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = _run(fresh_policy, tmp_path / "run", schedule="w", budget=160)
    out = export(tmp_path / "run", tmp_path / "export", merged=True)
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "program.json").exists()
    assert "--lora-modules cotune=adapter" in (out / "README.md").read_text()
    ids = torch.tensor([fresh_policy.encode_messages([{"role": "user", "content": "What is the last digit of 98765?"}])])
    with torch.no_grad():
        live = fresh_policy.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(fresh_policy.base_path, use_safetensors=True)
        peft_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", use_safetensors=True).eval()(input_ids=ids).logits
    assert result.history[-1].adapter_version > 0
    assert torch.allclose(live, peft_logits, atol=1e-5)
    assert torch.allclose(peft_logits, merged, atol=1e-4)
    with pytest.raises(FileExistsError):
        export(tmp_path / "run", out)


class CrashAt(OptimizeCallback):
    def __init__(self, index):
        self.index = index

    def on_stage_start(self, run, index, stage):
        if index == self.index:
            raise KeyboardInterrupt("simulated crash")


class AdapterAt(OptimizeCallback):
    """Snapshots the live adapter when stage ``index`` starts (after a resume restored the stages before it)."""

    def __init__(self, policy, index):
        self.policy, self.index, self.state = policy, index, None

    def on_stage_start(self, run, index, stage):
        if index == self.index:
            self.state = self.policy.adapter_state()


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_finished_stages(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from optimizers.evaluate import evaluate
    from rl import Policy

    policy = Policy.from_pretrained(tiny_model_dir, name="tiny-resume")
    with pytest.raises(KeyboardInterrupt):
        _run(policy, tmp_path / "run", schedule="w -> p", budget=320, callbacks=[CrashAt(2)])
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "failed" and state["finished"] == [0, 1]
    stage = tmp_path / "run" / "stages" / "1-w"
    first_w = json.loads((stage / "record.json").read_text())

    fresh = Policy.from_pretrained(tiny_model_dir, name="tiny-resume")  # a new process would start like this
    recorder, at_p = Recorder(), AdapterAt(fresh, 2)
    result = _run(fresh, tmp_path / "run", schedule="w -> p", budget=320, resume=True, callbacks=[recorder, at_p])
    assert [r.name for r in result.history] == ["0-baseline", "1-w", "2-p"]
    assert ("stage", 1, "w") not in recorder.events and ("stage", 2, "p") in recorder.events  # w was not redone
    assert result.spend["rollouts"] <= 320 and result.history[1].spend == first_w["spend"]
    # the restored state is the finished stage's, not just its recorded numbers
    saved = load_file(stage / "adapter" / "adapter_model.safetensors")
    assert at_p.state.keys() == saved.keys() and all(torch.equal(at_p.state[k], saved[k]) for k in saved)
    assert _trained(saved, Policy.from_pretrained(tiny_model_dir, name="tiny-untrained").adapter_state())
    fresh.load_adapter_state(saved)
    program = last_digit.predict_program()
    program.load_state(json.loads((stage / "program.json").read_text()))
    lm = fresh.lm(temperature=0.0, max_tokens=16, cache=False)
    again = evaluate(program, last_digit.load("val", 24, seed=SEED), as_rubric(last_digit.correct), lm, num_threads=1)
    assert again.score == pytest.approx(first_w["val_score"]) == pytest.approx(result.history[1].val_score)


@pytest.mark.slow
def test_self_train_stage_fine_tunes_on_successful_traces(fresh_policy, tmp_path):
    result = _run(fresh_policy, tmp_path / "run", schedule="s", budget=96,
                  self_training={"num_samples": 4, "temperature": 1.0, "learning_rate": 1e-3, "epochs": 2})
    s = result.history[1]
    print("self-train:", s.details["kept_rollouts"], "kept of", s.details["rollouts"], "val", s.val_score)
    assert s.details["rollouts"] == 96 and 0 < s.details["kept_rollouts"] < 96 and s.details["steps"] >= 2
    assert s.adapter_version == 1 and s.spend["rollouts"] == 96


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["bootstrap_rs", "mipro", "gepa", "simba"])
def test_each_dspy_optimizer_as_a_p_stage_finishes_in_its_share_and_changes_the_program(tiny_policy, optimizer):
    """Every optimizer ends inside its share (no budget wall) with a different program; the demo-adding ones lift
    held-out accuracy.

    What this proves on the tiny model: its warm-start labels long numbers correctly more often when demos are in
    the prompt, so *any* correct demos help (the random-demos control arm in experiments/quickstart.yaml measures
    that). GEPA only edits instructions, and the tiny model was warm-started on one fixed instruction, so a GEPA
    lift is impossible by design here: for GEPA the test asserts that the reflection LM's instruction was proposed
    and that GEPA kept the candidate that scored best on val.
    """
    scripted = {
        "mipro": DummyLM({"": {"program_description": "Finds the last digit.", "module_description": "One digit.",
                               "summary": "Last digits.", "observations": "Last digits.",
                               "proposed_instruction": "Answer with the last digit."}}),
        "gepa": DummyLM({"current_instruction": {"new_instruction": "Answer with the last digit."}},
                        adapter=dspy.JSONAdapter()),
        "simba": DummyLM({"": {"discussion": "Wrong digit.", "module_advice": {"self": "Copy the final digit."}}}),
    }
    prompt = {"optimizer": optimizer, "num_candidate_programs": 2, "max_bootstrapped_demos": 2, "num_threads": 4,
              "max_steps": 1, "minibatch_size": 6, "max_labeled_demos": 2,
              **{"mipro": {"auto": None, "num_trials": 4}, "gepa": {"auto": None, "max_metric_calls": 60}}.get(
                  optimizer, {})}
    extra = {"gepa": {"reflection_lm": scripted["gepa"]}}.get(optimizer, {"prompt_lm": scripted.get(optimizer)})
    untuned = last_digit.predict_program()
    result = _run(tiny_policy, schedule="p", budget=200, prompt=prompt, **extra)
    baseline, stage = result.history
    print(optimizer, "val", baseline.val_score, "->", stage.val_score, "spend", stage.spend, stage.note)
    assert stage.details["optimizer"] == optimizer and 0 < stage.spend["rollouts"] <= 200
    assert not stage.note, stage.note  # the optimizer finished; it did not hit the budget wall
    program = result.last_program
    if optimizer == "gepa":
        reflections = ["\n".join(m["content"] for m in h["messages"]) for h in scripted["gepa"].history]
        assert reflections, "GEPA never called the reflection LM"
        assert stage.val_score >= baseline.val_score  # GEPA returns its best val candidate, the seed included
        return
    assert sum(len(p.demos) for p in program.predictors()) > 0, "the optimizer did not change the program"
    before, after = _heldout(untuned, tiny_policy), _heldout(program, tiny_policy)
    print(f"{optimizer}: held-out {before:.3f} -> {after:.3f}")
    assert after >= before + 0.10, (before, after)


@pytest.mark.slow
def test_gold_metric_is_scored_per_stage_and_divergence_raises_an_alert(tiny_policy, tmp_path):
    def contrarian_gold(example, pred, trace=None):  # a gold metric that disagrees with the optimized one
        return 1.0 - last_digit.correct(example, pred)

    with pytest.warns(Warning, match="Possible reward hacking"):
        result = _run(tiny_policy, tmp_path / "run", schedule="p", budget=200, gold_metric=contrarian_gold)
    baseline, stage = result.history
    assert math.isclose(baseline.gold_score, 1.0 - baseline.val_score)
    assert stage.val_score > baseline.val_score and stage.gold_score < baseline.gold_score
    assert stage.events and "reward hacking" in stage.events[0]
    manifest = json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())
    assert manifest["gold_scores"]["1-p"] == stage.gold_score


class _PausesThenAnswers(dspy.Module):
    """Some Python work whose length depends on the question (as a tool's would), then one call."""

    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question):
        import time

        time.sleep(0.015 * (sum(map(ord, question)) % 5))  # 0-60 ms: longer than the engine's 15 ms window
        return self.answer(question=question)


def test_valset_scoring_batches_one_call_per_worker_whatever_the_timing(fresh_policy):
    """The outer loop's evaluation runs on declared rollout workers, so every engine batch holds one call from each
    worker (a timing window split them, and the padding of a different batch can flip a greedy token)."""
    from optimizers.evaluate import evaluate

    lm = fresh_policy.lm(temperature=0.0, max_tokens=16, cache=False)
    val = last_digit.load("val", 12, seed=SEED)
    first = evaluate(_PausesThenAnswers(), val, as_rubric(last_digit.correct), lm, num_threads=4)
    assert list(fresh_policy.engine.batch_sizes) == [4, 4, 4]
    again = evaluate(_PausesThenAnswers(), val, as_rubric(last_digit.correct), lm, num_threads=4)
    assert again.rows == first.rows and first.errors == 0 and [r["inputs"] for r in first.rows] == [
        dict(x.inputs()) for x in val]
