"""The stage protocol: what a stage kind is, and the registry of kinds that everything else reads.

Why: a stage kind (``p`` prompt optimization, ``w`` GRPO, ``s`` self-training) used to be known in seven files --
the schedule parser, ``optimize()``'s dispatch, two budget rules, the settings resolution, the YAML sections and the
CLI. Now each kind is one module (``optimizers/stages/prompt.py``, ``weights.py``, ``self_train.py``) that owns its
letter, its config class, its plan for a share of the budget and its run, and registers itself here. The rest of
cotune asks the registry: adding a kind is one new module plus :func:`register` (``tests/optimizers/test_stages.py``
adds a toy kind that way). The contract is small on purpose, like DSPy's ``Teleprompter.compile``:

* ``plan(share) -> StagePlan``: what the stage would do with ``share`` rollouts, including the smallest useful
  share; a share below it is refused before anything is spent (:func:`optimizers.budget.plan_run`);
* ``run(context, program, share) -> StageOutcome``: do it, starting from ``program`` and the policy's current
  adapter, and say what it cost.

One budget rule for every kind: a stage gets an equal part of what is left when it starts (``Meter.share``), and
the up-front plan gives out shares the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from optimizers.budget import StagePlan

if TYPE_CHECKING:
    import dspy

    from metrics import Rubric
    from optimizers.budget import Budget, Meter, Spend
    from rl.distributed import Ranks
    from rl.policy import Policy


@dataclass
class StageOutcome:
    """What a stage hands to the next one and to the run's record.

    Attributes:
        program: the program the next stage starts from (the same object when the stage changes no prompt).
        details: the stage's own record (steps, optimizer, configs...), kept in ``record.json`` and the manifest.
        note: one line for a person ("skipped: ...", "no successful run..."); empty when nothing needs saying.
        spend: rollouts and LM calls the stage spent (charged to the run's meter by the caller).
        adapter_version: the policy's adapter version after the stage (the adapter itself lives in the policy).
    """

    program: dspy.Module
    details: dict[str, Any]
    note: str
    spend: Spend
    adapter_version: int


@dataclass
class StageContext:
    """Everything of the run a stage may use: data, metric, policy, its folder, its forwarders to the callbacks.

    Built by ``optimize()`` once per stage; a stage kind reads what it needs and ignores the rest.
    """

    index: int
    trainset: list
    valset: list
    rubric: Rubric
    policy: Policy
    meter: Meter
    folder: Path
    resume: bool
    progress: bool
    eval_max_tokens: int
    ranks: Ranks
    on_step: Callable[[dict[str, Any]], None]
    on_rollouts: Callable[[int, Any], None]
    extras: dict[str, Any] = field(default_factory=dict)  # optimize()'s teleprompter, prompt_lm, reflection_lm


class Stage(Protocol):
    """One stage kind bound to its config for a run: the protocol every kind implements.

    Class attributes say what the kind is; an instance is made by ``Kind(config, n_train=, n_val=, **extras)``.
    """

    letter: ClassVar[str]  # the schedule's letter: "p" in "p -> w"
    section: ClassVar[str]  # optimize()'s argument, the experiment YAML's and cotune.json's section: "prompt"
    title: ClassVar[str]  # a few words for people: "prompt optimization"
    trains_weights: ClassVar[bool]  # True for kinds that change the adapter (a schedule's arm: rl-only / joint)
    config_cls: ClassVar[type]  # its config dataclass (fields with help text: `cotune config SECTION`)

    config: Any

    def plan(self, share: int | None) -> StagePlan:
        """What ``share`` rollouts buy (``index`` 0; the budget plan numbers it); ``min_share`` is the smallest
        useful share. Raises :class:`optimizers.errors.StageShareError` (``min_rollouts``, ``reason``) when
        ``share`` buys nothing useful."""

    def refusal(self, *, budget: int, index: int, share: int, schedule: str, reason: str, need: int) -> str:
        """The sentence that refuses this stage's ``share`` of ``budget`` before anything is spent (``need``: the
        smallest budget for the whole ``schedule``), in the kind's own words (what a user should change)."""

    def run(self, context: StageContext, program: dspy.Module, share: Budget) -> StageOutcome:
        """Run on ``share`` (rollouts and LM calls) from ``program`` and the policy's current adapter."""


class StageKind:
    """A base for stage kinds: the class keywords set what the protocol reads, and ``__init__`` keeps the config.

    ``class MyStage(StageKind, letter="m", section="mine", title="my stage", trains_weights=False,
    config_cls=MyConfig)``; a kind that needs more of the run (n_train, a teleprompter) defines its own ``__init__``.
    Any class with the protocol's attributes will do as well (``tests/optimizers/test_stages.py`` writes one out).
    """

    letter: ClassVar[str]
    section: ClassVar[str]
    title: ClassVar[str]
    trains_weights: ClassVar[bool]
    config_cls: ClassVar[type]

    def __init_subclass__(cls, *, letter: str, section: str, title: str, trains_weights: bool, config_cls: type,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.letter, cls.section, cls.title = letter, section, title
        cls.trains_weights, cls.config_cls = trains_weights, config_cls

    def __init__(self, config: Any, **_: Any) -> None:
        self.config = config


KINDS: dict[str, type] = {}  # letter -> kind class, in registration order (p, w, s, then any added)


def register(kind: type) -> type:
    """Add a stage kind (a class implementing :class:`Stage`) to the registry; usable as a class decorator.

    Raises:
        ValueError: the letter or section is taken by another kind, or the letter is not one lower-case letter.
    """
    letter, section = kind.letter, kind.section
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isalpha() and letter.islower()):
        raise ValueError(f"a stage kind's letter is one lower-case letter, got {letter!r}")
    for other in KINDS.values():
        if other is not kind and (other.letter == letter or other.section == section):
            raise ValueError(f"stage kind {kind.__name__} ({letter!r}, section {section!r}) clashes with "
                             f"{other.__name__} ({other.letter!r}, section {other.section!r})")
    KINDS[letter] = kind
    return kind


def unregister(letter: str) -> None:
    """Remove a kind (tests that add a toy kind take it out again)."""
    KINDS.pop(letter, None)


def sections() -> dict[str, type]:
    """``{section: config class}`` of every kind, in registration order (``{"prompt": PromptStageConfig, ...}``)."""
    return {kind.section: kind.config_cls for kind in KINDS.values()}
