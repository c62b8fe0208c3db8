"""The stage protocol: a stage kind is one module plus its registration, and everything else reads the registry.

The toy kind below is added the way a new kind would be (a class with the protocol's attributes, ``plan`` and
``run``, then :func:`optimizers.stages.register`); no other file of cotune changes, yet the schedule parser, the arm
names, the budget plan and its up-front refusal, the settings resolution and ``optimize()`` (its run folder, history
and spend) all handle it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest

from optimizers import Budget, StageShareError, optimize, parse_schedule, plan_run
from optimizers.budget import Spend
from optimizers.schedule import ScheduleError, arm_of
from optimizers.settings import resolve_settings
from optimizers.stages import KINDS, StageContext, StageOutcome, StagePlan, register, sections, unregister
from programs.tasks import last_digit


@dataclasses.dataclass
class ToyConfig:
    """Settings of the toy stage."""

    instruction: str = dataclasses.field(default="Answer with one digit.", metadata={"help": "appended instruction"})
    runs: int = dataclasses.field(default=3, metadata={"help": "train examples run per stage"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})


class ToyStage:
    """``t``: appends an instruction to every predictor and runs the program on a few train examples (its spend)."""

    letter: ClassVar[str] = "t"
    section: ClassVar[str] = "toy"
    title: ClassVar[str] = "toy instruction stage"
    trains_weights: ClassVar[bool] = False
    config_cls: ClassVar[type] = ToyConfig

    def __init__(self, config: ToyConfig, **_: Any) -> None:
        self.config = config

    def plan(self, share: int | None) -> StagePlan:
        if share is not None and share < self.config.runs:
            raise StageShareError(f"below {self.config.runs} runs", min_rollouts=self.config.runs)
        return StagePlan(0, self.letter, share, self.config.runs, f"t: {self.config.runs} runs",
                         min_share=self.config.runs)

    def refusal(self, *, budget: int, index: int, share: int, schedule: str, reason: str, need: int) -> str:
        return f"budget of {budget} gives stage {index} (t) {share}, {reason}; raise it to {need}"

    def run(self, context: StageContext, program, share: Budget) -> StageOutcome:
        program = program.deepcopy()
        for _, predictor in program.named_predictors():
            predictor.signature = predictor.signature.with_instructions(
                predictor.signature.instructions + " " + self.config.instruction)
        lm = context.policy.lm(temperature=0.0, max_tokens=context.eval_max_tokens, cache=False)
        import dspy

        with dspy.context(lm=lm):
            for example in context.trainset[: self.config.runs]:
                try:
                    program(**example.inputs())
                except Exception:  # noqa: BLE001 - a run that does not parse still ran (and is spent)
                    pass
        return StageOutcome(program, {"instruction": self.config.instruction}, "toy ran",
                            Spend(self.config.runs, self.config.runs), context.policy.version)


@pytest.fixture()
def toy_kind():
    register(ToyStage)
    yield ToyStage
    unregister("t")


def test_a_registered_kind_is_parsed_named_and_planned(toy_kind):
    assert parse_schedule("w -> t") == ("w", "t") and arm_of(("t",)) == "prompt-only"
    assert arm_of(("t", "w")) == "joint" and list(sections())[-1] == "toy"
    plans = plan_run(("t", "w"), Budget(rollouts=100), n_train=10, n_val=10, toy=ToyConfig(runs=5),
                     weights=KINDS["w"].config_cls(num_generations=4, examples_per_step=4))
    assert [p.text for p in plans][0] == "t: 5 runs" and plans[1].share == 95  # what t does not spend goes on
    with pytest.raises(StageShareError, match=r"gives stage 1 \(t\) 2, below 5 runs; raise it to 10"):
        plan_run(("t", "w"), Budget(rollouts=4), n_train=10, n_val=10, toy=ToyConfig(runs=5))


def test_an_unregistered_letter_is_refused_with_the_kinds_there_are():
    with pytest.raises(ScheduleError, match=r"unknown stage 't'.*'p' \(prompt optimization\), 'w' .*'s' "):
        parse_schedule("p -> t")


def test_a_kind_cannot_take_a_letter_or_section_already_registered():
    class Clash(ToyStage):
        letter = "w"

    with pytest.raises(ValueError, match="clashes with WeightStage"):
        register(Clash)
    assert KINDS["w"].__name__ == "WeightStage"


def test_settings_of_a_registered_kind_resolve_like_the_built_in_ones(toy_kind, tiny_policy):
    settings = resolve_settings(tiny_policy, seed=3, toy={"runs": 2})
    assert settings.toy == ToyConfig(runs=2, seed=3) and settings.sources["toy"] == {"runs": "user"}
    assert settings.weights.seed == 3  # the built-in sections are still there


def test_optimize_runs_a_registered_kind_through_the_protocol(toy_kind, tiny_policy, tmp_path):
    train, val = last_digit.load("train", 8, seed=0), last_digit.load("val", 8, seed=0)
    result = optimize(last_digit.predict_program(), train, val, metric=last_digit.correct, policy=tiny_policy,
                      schedule="t", budget=20, stage_settings={"toy": {"runs": 4, "instruction": "Be brief."}},
                      output_dir=tmp_path / "run", progress=False, eval_threads=4)
    assert [r.name for r in result.history] == ["0-baseline", "1-t"]
    record = result.history[1]
    assert record.details == {"instruction": "Be brief."} and record.note == "toy ran"
    assert record.spend == {"rollouts": 4, "lm_calls": 4} and record.total_spend["rollouts"] == 4
    assert all(p.signature.instructions.endswith("Be brief.") for _, p in result.last_program.named_predictors())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "completed" and run["params"]["toy"] == {"instruction": "Be brief.", "runs": 4, "seed": 0}
    assert run["params"]["arm"] == "prompt-only" and (tmp_path / "run" / "stages" / "1-t" / "record.json").is_file()
