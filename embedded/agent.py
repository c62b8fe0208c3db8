"""The embedded agent model: a tiny LM warm-started on whole ReAct episodes of ``react_tools``, shipped with cotune.

Why: cotune exists to improve agent programs (multi-step, tool-calling, several predictors), and the last-digit model
cannot even format one ReAct call. This model runs the real ``dspy.ReAct`` program of
:mod:`programs.tasks.react_tools` on a laptop: it formats every ``react`` step and the ``extract`` call, picks the
tool sequence for each question kind, copies names from the question and numbers from observations, and is
*sometimes* right, so both stage kinds have honest headroom.

How it is built (the recipe; :func:`agent_model_path` with ``from_recipe=True`` or ``cotune model build agent``):

* **Episodes, not calls.** A scripted *teacher* answers every LM call of the real ReAct program (our own tools,
  DSPy's own ChatAdapter), and each call is recorded exactly as the engine would render it
  (:func:`rl.engine.chat_messages`), with the teacher's completion as the target. So the model is trained on the
  text it sees at inference time; we never re-implement DSPy's format.
* **More worlds than one.** The questions of one generated world are too few to learn *copying* (numbers repeat,
  so a model memorises them); the teacher also plays in fresh worlds of :mod:`programs.tasks.world` (other seeds,
  their own corpus behind the same ``lookup`` tool). No warm-start episode looks up an entity that a val or test
  question of the shipped world looks up, so held-out questions stay unseen.
* **Copying first.** The first steps train on short "repeat this" drills over invented names and numbers alone
  (:func:`copy_drills`), then on everything: an agent copies unseen names into ``lookup`` and numbers into its
  expressions, and that skill formed only this way (see :func:`model_recipe`).
* **An imperfect teacher.** Like a weaker model, the teacher makes one systematic mistake per question kind, on a
  fraction of the questions chosen by a hash of the question (never by a prompt feature such as demos or the
  instruction): it forgets the unit conversion (``elevation_feet``), swaps the operands of the subtraction
  (``founding_gap``), adds the wrong fact of the two companies (``total_employees``) and stops one step early
  without computing (``founding_age``). Where the teacher is right on fewer than half of a kind, greedy decoding
  follows the mistake while sampling still finds the right path sometimes: that is the signal GRPO can use.

Why shipped: as for the tiny model (:mod:`embedded.tiny`), builds are deterministic per CPU, not across CPUs.

Example:
    >>> from embedded import agent_model_path
    >>> (agent_model_path() / "model.safetensors").exists()      # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy

from embedded.shipped import ship, verified
from embedded.tiny_model import TinyModelRecipe, build_dir, build_or_load
from programs.tasks import react_tools, world
from programs.tasks.corpus import Passage, Retriever, read_jsonl
from programs.tasks.splits import take
from programs.tasks.tools import make_tools

AGENT_NAME = "agent-react-tools"
SHIPPED_DIR = Path(__file__).parent / "weights" / AGENT_NAME
SHIPPED_SEED = 0
WARMSTART_VERSION = 3  # bump when the teacher or the episode renderer changes what it produces


# --- the imperfect teacher ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherRecipe:
    """How often the teacher is right, per question kind (the rest get that kind's systematic mistake)."""

    p_right: dict[str, float] = field(default_factory=lambda: {
        "elevation_feet": 0.75, "total_employees": 0.65, "founding_gap": 0.3, "founding_age": 0.3})
    worlds: int = 6  # extra generated worlds (seeds 1..worlds) besides the shipped one
    copy_drills: int = 12000  # "repeat this" conversations over invented names and numbers: the build's curriculum
    max_iters: int = react_tools.DEFAULT_MAX_ITERS


MISTAKES = {
    "elevation_feet": "forgets the unit conversion (answers in meters)",
    "founding_gap": "swaps the operands of the subtraction (a negative gap)",
    "total_employees": "adds the founding years instead of the employee counts",
    "founding_age": "stops one step early (answers the founding year, no calculator)",
}


def teacher_is_right(question: str, kind: str, recipe: TeacherRecipe) -> bool:
    """Whether the teacher answers this question correctly: a stable hash of the question against ``p_right``."""
    u = int(hashlib.sha256(f"teacher/{question}".encode()).hexdigest()[:8], 16) / 16**8
    return u < recipe.p_right[kind]


_FACTS = {"founded": r"founded in (\d+)", "employees": r"employs (\d+)", "born": r" in (\d+)\.",
          "elevation": r"elevation of (\d+) meters"}


def _fact(passage: Passage, what: str) -> str:
    match = re.search(_FACTS[what], passage.text)
    if match is None:
        raise ValueError(f"passage {passage.title!r} states no {what}")
    return match.group(1)


@dataclass(frozen=True)
class Step:
    """One ``react`` completion of the teacher: thought, tool and its arguments."""

    thought: str
    tool: str
    args: dict[str, Any]


def teach(row: dict, retriever: Retriever, right: bool) -> tuple[list[Step], dict[str, str]]:
    """The teacher's episode for one question: its ``react`` steps and its ``extract`` outputs.

    The teacher reads the facts from the passages the ``lookup`` tool returns (as an agent would), states each
    fact in its next thought, and writes the expression or conversion in the thought before calling the tool.
    """
    from programs.tasks.tools import calculator, convert_units

    kind = row["kind"]
    names = [c["args"]["name"] for c in row["gold_calls"] if c["tool"] == "lookup"]
    page = [retriever.lookup(n) for n in names]
    if kind == "elevation_feet":
        city, meters = names[0], _fact(page[0], "elevation")
        steps = [Step(f"I need the elevation of {city}.", "lookup", {"name": city})]
        if not right:
            steps.append(Step(f"{city} is at {meters} meters. I have the answer.", "finish", {}))
            return steps, {"reasoning": f"The elevation is {meters}.", "answer": meters}
        feet = convert_units(int(meters), "m", "ft")
        steps += [Step(f"{city} is at {meters} meters. Convert {meters} m to ft.", "convert_units",
                       {"value": int(meters), "from_unit": "m", "to_unit": "ft"}),
                  Step(f"That is {feet} feet.", "finish", {})]
        return steps, {"reasoning": f"{meters} m is {feet} ft.", "answer": feet}
    first, second = names
    facts = {"founding_gap": ("founded", "founded"), "total_employees": ("employees", "employees"),
             "founding_age": ("born", "founded")}[kind]
    if kind == "total_employees" and not right:
        facts = ("founded", "founded")
    a, b = _fact(page[0], facts[0]), _fact(page[1], facts[1])
    said = {"founded": "was founded in", "employees": "employs", "born": "was born in"}
    steps = [Step(f"I need {first} first.", "lookup", {"name": first}),
             Step(f"{first} {said[facts[0]]} {a}. Now {second}.", "lookup", {"name": second})]
    fact_b = f"{second} {said[facts[1]]} {b}."
    if kind == "founding_age" and not right:
        steps.append(Step(f"{fact_b} I have the answer.", "finish", {}))
        return steps, {"reasoning": f"It was founded in {b}.", "answer": b}
    if kind == "total_employees":
        expression = f"{a} + {b}"
    elif kind == "founding_gap" and not right:
        expression = f"{a} - {b}"
    else:
        expression = f"{b} - {a}"
    value = calculator(expression)
    steps += [Step(f"{fact_b} Compute {expression}.", "calculator", {"expression": expression}),
              Step(f"The result is {value}.", "finish", {})]
    return steps, {"reasoning": f"{expression} = {value}.", "answer": value}


# --- rendering whole episodes through the real program -----------------------------------------------------------

class _ScriptedEngine:
    """A DSPy custom engine that answers with the teacher's next completion and records what it was sent."""

    supports_function_calling = False
    supports_reasoning = False
    supports_response_schema = False

    def __init__(self) -> None:
        self.script: list[str] = []
        self.record: list[list[dict]] = []

    def __deepcopy__(self, memo: dict) -> _ScriptedEngine:
        return self

    def complete(self, request):
        from dspy.lm15 import Message, Response, Usage

        from rl.engine_base import chat_messages

        if not self.script:
            raise RuntimeError("the teacher's script ran out: the episode took more calls than the teacher planned")
        text = self.script.pop(0)
        self.record.append([*chat_messages(request), {"role": "assistant", "content": text}])
        return Response(id=f"teacher-{len(self.record)}", model=request.model, message=Message.assistant(text),
                        finish_reason="stop", usage=Usage(input_tokens=0, output_tokens=0, total_tokens=0))


def render_episodes(rows: Sequence[dict], retriever: Retriever, recipe: TeacherRecipe) -> list[list[dict]]:
    """Every LM call of the teacher's episodes on ``rows``, as chat messages ending in the teacher's completion.

    The episodes run through ``dspy.ReAct`` with :func:`programs.tasks.tools.make_tools` over ``retriever``, so
    prompts, trajectories and observations are exactly the real program's.
    """
    program = dspy.ReAct(react_tools.ToolQuestion, tools=make_tools(retriever), max_iters=recipe.max_iters)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    engine = _ScriptedEngine()
    lm = dspy.LM("local/teacher", engine=engine, cache=False)
    out = []
    with dspy.context(lm=lm, adapter=adapter):
        for row in rows:
            steps, final = teach(row, retriever, teacher_is_right(row["question"], row["kind"], recipe))
            engine.script = [
                adapter.format_assistant_message_content(
                    program.react.signature,
                    {"next_thought": s.thought, "next_tool_name": s.tool, "next_tool_args": s.args})
                for s in steps
            ] + [adapter.format_assistant_message_content(program.extract.predict.signature, final)]
            engine.record = []
            pred = program(question=row["question"])
            failed = [o for _, _, o in react_tools.tool_steps(pred) if o.startswith(react_tools.ERROR_PREFIX)]
            if engine.script or failed or str(pred.answer) != final["answer"]:
                raise RuntimeError(f"the teacher's episode for {row['id']} did not run as planned: {failed}")
            out += engine.record
    return out


def _held_out_names() -> set[str]:
    """Every entity a val or test question of the shipped world looks up (casefolded)."""
    rows = read_jsonl("tools.jsonl")
    held = [r for s in ("val", "test") for r in take(rows, s, None, key=lambda r: r["id"], group=lambda r: r["group"])]
    return {c["args"]["name"].casefold() for r in held for c in r["gold_calls"] if c["tool"] == "lookup"}


def _looks_up(row: dict) -> set[str]:
    return {c["args"]["name"].casefold() for c in row["gold_calls"] if c["tool"] == "lookup"}


def warmstart_worlds(recipe: TeacherRecipe = TeacherRecipe()) -> Iterator[tuple[list[dict], Retriever]]:
    """The teacher's questions and their corpus, world by world: the shipped world's train split, then fresh worlds.

    Questions that look up an entity of a held-out (val or test) question of the shipped world are left out.
    """
    from programs.tasks.corpus import default_retriever

    held = _held_out_names()
    shipped = take(read_jsonl("tools.jsonl"), "train", None, key=lambda r: r["id"], group=lambda r: r["group"])
    yield [r for r in shipped if not _looks_up(r) & held], default_retriever()
    for w in range(1, recipe.worlds + 1):
        generated = world.build(seed=w)
        yield ([r for r in generated.tools if not _looks_up(r) & held],
               Retriever([Passage(p["id"], p["title"], p["text"]) for p in generated.passages]))


COPY_SYSTEM = "Repeat the user's message exactly."


def copy_drills(n: int, seed: int = 0) -> list[list[dict]]:
    """``n`` short conversations whose answer repeats the user's message: invented names and numbers.

    Why: an agent must copy unseen names from the question into its tool calls and numbers from observations into
    its expressions, and the episodes alone did not teach that (measured: names came out as plausible inventions,
    "Wabroth Zakrai" -> "Wabroth Zabro", so ``lookup`` found the wrong entity). Like the copying a pretrained model
    brings from its pretraining text, the drills teach it in a format of their own (their own system message),
    over names made as the worlds make theirs (never a held-out entity: fresh random words).
    """
    rng = random.Random(f"agent-copy/{seed}")
    suffixes = ["", "", " Works", " Group", " Trading", " Labs"]
    out = []
    for _ in range(n):
        items = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.3:
                items.append(str(rng.randint(1, 9999)))
            else:
                words = [world.invented_word(rng, rng.randint(2, 3)) for _ in range(rng.randint(1, 2))]
                items.append(" ".join(words) + rng.choice(suffixes))
        text = rng.choice([", ", "; ", " and "]).join(items) + rng.choice(["", "."])
        out.append([{"role": "system", "content": COPY_SYSTEM}, {"role": "user", "content": text},
                    {"role": "assistant", "content": text}])
    return out


def warmstart_episodes(recipe: TeacherRecipe = TeacherRecipe(), seed: int = 0) -> list[list[dict]]:
    """The warm-start corpus in a seeded order: every LM call of the teacher's episodes in
    :func:`warmstart_worlds` (the :func:`copy_drills` are the build's curriculum, passed apart)."""
    calls = [call for rows, retriever in warmstart_worlds(recipe) for call in render_episodes(rows, retriever, recipe)]
    random.Random(f"agent-warmstart/{seed}").shuffle(calls)
    return calls


# --- the recipe, the cached build and the shipped weights ---------------------------------------------------------

def model_recipe(seed: int = SHIPPED_SEED) -> TinyModelRecipe:
    """The agent model's size and warm-start settings.

    Measured greedy on the 72 test questions (``measure_agent_band``; 7 worlds, ~35k episode calls, 12,000 copy
    drills). **This recipe** (2,400 steps, the first 500 on the copy drills alone; 17 min on 2 idle cores, rendering
    included): 99.4% of steps parse, 100% of tool calls valid, **success 45.8%**: elevation_feet 94%,
    total_employees 89%, founding_age 0%, founding_gap 0% (the two kinds where the teacher is right 30% of the time;
    greedy follows its mistake). Sampled at T=1: 25.7%, founding_age 12%, founding_gap 3%.

    Why a curriculum (``first_steps``): the same corpus at 1,200 steps, 1 thread each, side by side:
    drills first for 400 steps, then everything: success 20.8%, 17 of 30 fresh drills repeated exactly; drills mixed
    in from the start: 0.0%, 0 of 30. Copying an unseen multi-token name forms on the drills and carries over to
    the episodes; mixed in from the start it never formed, and the model wrote plausible inventions instead
    ("Wabroth Zakrai" -> "Wabroth Zakru"), so ``lookup`` found another entity.

    Earlier builds, all without the curriculum (same measurement):

    * vocab 2,000, one token per digit, completion loss only: hidden 128 or 192, 1,800-3,000 steps: 95-98% parse,
      99.5-100% valid, success 0%.
    * + ``prompt_loss_weight=0.5`` (hidden 192, 2,400 steps): success 1.4%; numbers copy, names do not.
    * + vocab 4,000, digit runs as BPE tokens, 6 heads, copy drills mixed in (lr 3e-3): success 5.6%.
    * the same at lr 1e-3, no prompt loss: 9.7% (elevation_feet 33%, founding_gap 6%); drills 0/60.
    * drill-only probes (hidden 128, 800 steps): copying forms at lr 1e-3 (completion loss 0.6-1.0), not at 3e-3
      (1.8-2.4) nor with prompt loss on the drills' random text (2.9-3.0); a tokenizer that isolates capitalised
      words never formed it (loss 3.0, 0 of 60 drills).
    """
    return TinyModelRecipe(vocab_size=4000, hidden_size=192, intermediate_size=384, num_layers=4, num_heads=6,
                           num_kv_heads=3, max_positions=1024, steps=2400, batch_size=32, lr=1e-3, warmup_steps=50,
                           individual_digits=False, first_steps=500, seed=seed)


def _recipe(seed: int) -> tuple[TinyModelRecipe, TeacherRecipe, dict]:
    teacher = TeacherRecipe()
    key = {"teacher": asdict(teacher), "seed": seed, "generator": WARMSTART_VERSION}
    return model_recipe(seed), teacher, key


def agent_model_path(seed: int = SHIPPED_SEED, progress: Callable[[int, int, float], None] | None = None,
                     force: bool = False, from_recipe: bool = False) -> Path:
    """The agent model's HF folder: the shipped weights, or a build of the recipe in ``$COTUNE_CACHE``; the
    arguments mean what they mean for :func:`embedded.tiny.tiny_model_path`."""
    if seed == SHIPPED_SEED and not (from_recipe or force):
        return shipped_agent_model_path()
    recipe, teacher, key = _recipe(seed)
    return build_or_load(AGENT_NAME, lambda: warmstart_episodes(teacher, seed=seed), recipe=recipe, extra_key=key,
                         progress=progress, force=force, first_fn=lambda: copy_drills(teacher.copy_drills, seed))


def shipped_agent_model_path() -> Path:
    """The shipped model folder, after checking every file against the sha256 in its ``build_info.json``.

    Raises:
        EmbeddedModelError: a file is missing or was changed (reinstall cotune, or rebuild and re-ship it with
            ``cotune model build agent --ship``).
    """
    return verified(SHIPPED_DIR, "agent")


def recipe_build_dir(seed: int = SHIPPED_SEED) -> Path:
    """Where a build of the recipe lives in ``$COTUNE_CACHE`` (it may not exist yet)."""
    recipe, _, key = _recipe(seed)
    return build_dir(AGENT_NAME, recipe, key)


def ship_agent_model(build: str | Path, dest: str | Path = SHIPPED_DIR,
                     measured: dict[str, AgentMeasurement] | None = None) -> Path:
    """Copy a recipe build into the package (``dest``) with the sha256 of every file in its ``build_info.json``.

    ``measured`` (from :func:`measure_agent_band`) is recorded there too, so the per-kind behaviour of the shipped
    weights travels with them. The shipped ``cotune.json`` (stage settings measured on the shipped weights) is
    carried over when the build has none; re-measure it after shipping new weights.
    """
    extra = {"band": {arm: m.as_dict() for arm, m in measured.items()}} if measured is not None else None
    return ship(build, dest, SHIPPED_DIR, extra)


def agent_policy(seed: int = SHIPPED_SEED, **policy_kwargs):
    """A :class:`rl.Policy` on the agent model (the shipped weights for seed 0)."""
    from rl.policy import Policy

    return Policy.from_pretrained(agent_model_path(seed=seed), name=AGENT_NAME, **policy_kwargs)


# --- measuring the agent: per step, per tool call, per question kind ---------------------------------------------

@dataclass(frozen=True)
class AgentMeasurement:
    """How the agent does on held-out questions.

    ``steps`` counts every LM call (``react`` steps and ``extract``); a step parses when DSPy's ChatAdapter parses
    its completion into the predictor's fields. ``tool_calls`` counts parsed ``react`` steps that call a tool other
    than ``finish``; a call is valid when the tool runs on its arguments without an error.
    """

    episodes: int
    success: float
    episodes_parsed: float
    steps: int
    step_parse_rate: float
    tool_calls: int
    tool_validity: float
    per_kind: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v['success']:.0%}" for k, v in sorted(self.per_kind.items()))
        return (f"episodes={self.episodes} success={self.success:.1%} ({kinds}); steps parsed "
                f"{self.step_parse_rate:.1%} of {self.steps}; tool calls valid {self.tool_validity:.1%} of "
                f"{self.tool_calls}; episodes parsed {self.episodes_parsed:.1%}")


def held_out(split: str = "test") -> list[dspy.Example]:
    """Every question of a held-out split of the shipped world (the test split: 72 questions, 18 per kind)."""
    rows = take(read_jsonl("tools.jsonl"), split, None, key=lambda r: r["id"], group=lambda r: r["group"])
    return react_tools.task().load(split, len(rows))


def _call_checks(program: dspy.Module, calls: Sequence[Any]) -> tuple[int, int, int, int]:
    """(steps, parsed steps, tool calls, valid tool calls) of one episode's recorded LM calls."""
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    steps = parsed = tools = valid = 0
    for call in calls:
        steps += 1
        predictor = call.predictor if call.predictor is not None else program.react
        try:
            fields = adapter.parse(predictor.signature, call.text)
        except Exception:  # noqa: BLE001 - an unparsable step is what is being counted
            continue
        parsed += 1
        name = fields.get("next_tool_name")
        if "next_tool_name" in predictor.signature.output_fields and name != "finish":
            tools += 1
            try:
                program.tools[name](**(fields.get("next_tool_args") or {}))
                valid += 1
            except Exception:  # noqa: BLE001 - a tool that raised is an invalid call
                pass
    return steps, parsed, tools, valid


def measure_agent(examples: Sequence[dspy.Example] | None = None, *, policy: Any, temperature: float = 0.0,
                  samples: int = 1, max_tokens: int = 64) -> AgentMeasurement:
    """Run the real ReAct program of ``react_tools`` on held-out questions; measure steps, tool calls and success.

    Args:
        examples: the questions (default: the 72 test questions, :func:`held_out`).
        policy: the :class:`rl.Policy` to run (with whatever adapter it holds).
        temperature: 0 for greedy decoding; sampled runs make ``samples`` runs per question.
        max_tokens: per LM call (the teacher's longest completion is under 40 tokens).
    """
    from rl.rollouts import run_rollouts

    examples = list(examples if examples is not None else held_out())
    task = react_tools.task()
    program = task.program()
    lm = policy.lm(temperature=temperature, max_tokens=max_tokens, cache=False)
    rollouts = run_rollouts(program, examples, lm, task.gold_metric, samples, num_threads=16, tag="agent-band")
    totals = [0, 0, 0, 0]
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for r in rollouts:
        for i, v in enumerate(_call_checks(program, r.calls)):
            totals[i] += v
        by_kind.setdefault(r.example.kind, []).append((float(r.reward >= 0.999), float(r.error is None)))

    def mean(xs) -> float:
        xs = list(xs)
        return sum(xs) / len(xs) if xs else 0.0

    every = [x for xs in by_kind.values() for x in xs]
    return AgentMeasurement(
        episodes=len(rollouts), success=mean(s for s, _ in every), episodes_parsed=mean(p for _, p in every),
        steps=totals[0], step_parse_rate=totals[1] / max(1, totals[0]), tool_calls=totals[2],
        tool_validity=totals[3] / max(1, totals[2]),
        per_kind={k: {"n": len(xs), "success": mean(s for s, _ in xs), "parsed": mean(p for _, p in xs)}
                  for k, xs in sorted(by_kind.items())})


BAND_ARMS = ("greedy", "sampled")


def measure_agent_band(path: str | Path, samples: int = 4) -> dict[str, AgentMeasurement]:
    """The agent on the 72 test questions: greedy, and sampled at T=1 (``samples`` runs per question); printed."""
    from rl.policy import Policy

    policy = Policy.from_pretrained(path, name="agent-band")
    out = {"greedy": measure_agent(policy=policy),
           "sampled": measure_agent(policy=policy, temperature=1.0, samples=samples)}
    for arm, m in out.items():
        print(f"{arm:8s} {m}")
    return out


def agent_band_problems(m: dict[str, AgentMeasurement]) -> list[str]:
    """What keeps a measured agent model out of the band the tests rely on (empty: in the band).

    Greedy on the held-out test questions: at least 95% of steps parse, at least 80% of tool calls are valid, and
    the task is solved sometimes but far from always (20-50%: headroom for both stage kinds).
    """
    g = m["greedy"]
    checks = [
        (g.step_parse_rate >= 0.95, f"greedy step parse rate {g.step_parse_rate:.1%} < 95%"),
        (g.tool_validity >= 0.80, f"greedy tool-call validity {g.tool_validity:.1%} < 80%"),
        (0.20 <= g.success <= 0.50, f"greedy task success {g.success:.1%} outside 20-50%"),
    ]
    return [problem for ok, problem in checks if not ok]
