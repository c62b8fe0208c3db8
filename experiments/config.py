"""Experiment files (``experiments/*.yaml``): one schema, validated before anything runs.

Why a schema of our own: an experiment is hours of CPU; a typo in ``weights.learnin_rate`` or a schedule
``"p -> x"`` must fail in a second, with the file, the line and the key named, not after the first arm.
PyYAML's node tree carries line numbers (``yaml.compose``); we keep them for every key and report errors as
``quickstart.yaml:12: weights.learning_rate: must be > 0, got -1``.

The file::

    name: quickstart                 # MLflow experiment name (unless tracking.experiment says otherwise)
    task: last_digit                 # a registered task, or {name: last_digit, options: {min_digits: 5}}
    program: predict                 # one of the task's programs (default: the task's default program)
    model: tiny                      # an embedded model ("tiny", "agent": embedded.MODELS) or a local HF model folder
    engine: local                    # generation: "local" (in-process), "vllm" (start a server) or http://host:port
    vllm: {dtype: bfloat16}          # rl.vllm_server.VLLMServer.start (or .attach, with a URL) options + adapter_dir
                                     # (python: only scripts/vllm_venv.sh's venv, unless allow_custom_python: true)
    metric: rubric                   # "rubric" (the task's), "gold" (its gold metric), "package.module:attr", or a
                                     # calibrated rubric file `cotune calibrate` wrote (calibrated/NAME-vK.json)
    gold: true                       # also score the task's gold metric (never optimized): reward-hacking guard
    data: {train: 32, val: 32, test: 100, seed: 0}
    arms:                            # name -> schedule (or a list of schedules, named by their arm)
      prompt-only: "p"
      random-demos: {schedule: "p", prompt: {optimizer: random_demos}}   # an arm's own prompt settings
      rl-only: "w"
      joint: "p -> w"
    seeds: [0, 1, 2]                 # or a count: 3
    budget: 600                      # rollouts per run, or {rollouts: 600, lm_calls: 2000}
    prompt: {num_candidate_programs: 8}     # optimizers.PromptStageConfig fields
    weights: {learning_rate: 1.0e-3}        # rl.WeightStageConfig fields
    self_training: {}                       # rl.config.SelfTrainConfig fields
    lora: {r: 16, alpha: 32}                # rl.LoraSettings fields
    tracking: {uri: sqlite:///mlflow.db, experiment: quickstart, traces: 4}   # traces: per stage, for review
    threads: 1                       # torch CPU threads (1 is fastest for the tiny model on 2 cores)
    tune:                            # `cotune tune`: Optuna study over this experiment
      storage: sqlite:///optuna.db
      space:
        schedule: {choices: ["p -> w", "w -> p"]}
        weights.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}

Note: YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); numeric strings are accepted for float fields.

**An experiment file can run code**, as a Python script can: ``metric: package.module:attr`` imports that module
(when the file is loaded) and calls the function, and ``vllm.python`` names an executable cotune starts. So both are
limited (:func:`metrics.references.import_reference`, :func:`_check_vllm_python`): references resolve from installed packages and
``$PYTHONPATH`` only, never from the current directory or the standard library; ``vllm.python`` must be the venv
``scripts/vllm_venv.sh`` builds unless ``allow_custom_python: true`` says otherwise; and ``vllm.extra_args`` and
``vllm.env``, which can make the server import code (``--trust-remote-code``, ``--middleware``, ``LD_PRELOAD``,
``PYTHONPATH``...), take only the flags in :data:`SAFE_SERVE_FLAGS` and no variable in :data:`CODE_ENV`, unless
``allow_unchecked_args: true`` says otherwise (:func:`_check_vllm_args`). Still, run only experiment files you would
run as scripts.

Arm names become folder names (``<output_dir>/<arm folder>/seed-<k>``, :func:`arm_folder`); names whose folders
would collide or leave ``output_dir`` (``..``) are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.space import Param, TuneError, parse_param

Path_ = tuple[Any, ...]

TOP_KEYS = ("name", "description", "task", "program", "model", "engine", "vllm", "metric", "gold", "data", "arms", "seeds", "budget",
            "prompt", "weights", "self_training", "lora", "eval", "tracking", "output_dir", "report_dir", "threads",
            "tune")
DATA_KEYS = {"train": 32, "val": 32, "test": 0, "seed": 0}
TRACKING_KEYS = ("uri", "experiment", "artifacts", "traces")
EVAL_KEYS = ("threads", "max_tokens")
TUNE_KEYS = ("study", "storage", "seed", "direction", "sampler", "pruner", "space", "enqueue", "trials")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "none")


class ConfigError(ValueError):
    """A bad experiment file; ``str()`` is one line: ``FILE:LINE: KEY: what is wrong``."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, key: str = "") -> None:
        self.source, self.line, self.key, self.problem = source, line, key, message
        where = source + (f":{line}" if line else "")
        text = ": ".join(part for part in (where, key, message) if part)
        super().__init__(" ".join(text.split()))


class _Problem(Exception):
    """Raised inside validation with the key path; turned into a :class:`ConfigError` with its line."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


# --- the validated experiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: a name (tag ``arm``), its schedule (``"p -> w"``) and the prompt settings that
    override the experiment's for this arm alone (a control arm: ``{optimizer: random_demos}``)."""

    name: str
    schedule: str
    prompt: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def folder(self) -> str:
        """The arm's folder under the experiment's ``output_dir`` (see :func:`arm_folder`)."""
        return arm_folder(self.name)


RESERVED_FOLDERS = ("tune",)  # output_dir/tune/ holds `cotune tune`'s trials


def arm_folder(name: str) -> str:
    """The folder name of an arm: ``"p -> w"`` -> ``p-w``; other characters than letters, digits, ``-``, ``_``
    and ``.`` become ``_``. The validator refuses arms whose folders would be unsafe or shared."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(" -> ", "-"))


def check_arm_folders(names: list[str]) -> list[tuple[int, str]]:
    """Problems with the arms' folders, as (index of the arm, message): a folder name that is not a plain
    child of ``output_dir`` (``..``, ``.``, a hidden name, too long, reserved), or two arms sharing one folder
    (``"a/b"`` and ``"a b"`` are both ``a_b``; case-insensitive file systems merge ``A`` and ``a``)."""
    problems: list[tuple[int, str]] = []
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        folder = arm_folder(name)
        if not folder or folder.startswith(".") or len(folder) > 100 or folder in RESERVED_FOLDERS:
            why = ("is reserved for `cotune tune`'s trials" if folder in RESERVED_FOLDERS else
                   "would be a hidden or parent folder" if folder.startswith(".") else
                   "is too long (100 characters at most)" if folder else "is empty")
            problems.append((i, f"arm name {name!r} cannot name a folder: {folder!r} {why}; rename the arm "
                                f"(letters, digits, '-', '_', '.')"))
        elif folder.lower() in seen:
            problems.append((i, f"arm names {seen[folder.lower()]!r} and {name!r} would share the folder "
                                f"{folder!r} (other characters than letters, digits, '-', '_' and '.' become "
                                "'_', and case is ignored); rename one of them"))
        else:
            seen[folder.lower()] = name
    return problems


@dataclass(frozen=True)
class TuneSpec:
    """The ``tune:`` section: where the Optuna study lives and what it searches."""

    study: str
    storage: str | None = None
    seed: int = 0
    direction: str = "maximize"
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    trials: int | None = None


@dataclass(frozen=True)
class Experiment:
    """A validated experiment file (see the module docstring for the keys)."""

    name: str
    task: str | dict[str, Any]
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    budget: int | dict[str, int] | None
    program: str | None = None
    model: str = "tiny"
    engine: str = "local"
    vllm: dict[str, Any] = field(default_factory=dict)
    metric: str = "rubric"
    gold: bool = True
    description: str = ""
    data: dict[str, int] = field(default_factory=lambda: dict(DATA_KEYS))
    prompt: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    self_training: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    tracking_experiment: str | None = None
    log_artifacts: bool = True
    traces_per_stage: int = 4
    output_dir: str | None = None
    report_dir: str | None = None
    threads: int | None = None
    tune: TuneSpec | None = None
    source: str = ""

    @property
    def task_name(self) -> str:
        return self.task if isinstance(self.task, str) else str(self.task["name"])

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking_experiment or self.name

    @property
    def runs_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    @property
    def reports_dir(self) -> Path:
        return Path(self.report_dir or Path("reports") / self.name)

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"no arm named {name!r}; the arms are {[a.name for a in self.arms]}", source=self.source)

    def with_overrides(self, params: Mapping[str, Any]) -> Experiment:
        """A copy with dotted overrides applied (``{"weights.beta": 0.04, "schedule": "p -> w"}``), as a trial uses.

        ``schedule`` replaces the arms by one arm named after the schedule.
        """
        changes: dict[str, Any] = {}
        for key, value in params.items():
            if key == "schedule":
                changes["arms"] = (Arm(name=str(value), schedule=str(value)),)
                continue
            if key == "budget":
                changes["budget"] = value
                continue
            section, _, leaf = key.partition(".")
            if section not in ("prompt", "weights", "self_training", "lora") or not leaf:
                raise ConfigError(f"cannot override {key!r}", source=self.source)
            changes.setdefault(section, dict(getattr(self, section)))[leaf] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The experiment as plain data (what ``best_config.yaml`` and MLflow params record)."""
        out = dataclasses.asdict(self)
        out["arms"] = {a.name: {"schedule": a.schedule, "prompt": a.prompt} if a.prompt else a.schedule
                       for a in self.arms}
        out["seeds"] = list(self.seeds)
        return out


# --- loading ------------------------------------------------------------------------------------


def load_experiment(path: str | os.PathLike, *, check_task: bool = True) -> Experiment:
    """Read and validate an experiment file.

    Args:
        path: the YAML file.
        check_task: resolve the task and program names now (so a typo fails before any run).

    Raises:
        ConfigError: missing file, YAML syntax error, unknown or missing key, bad value; the message names the
            file, the line and the key.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError("no such experiment file (pass a path such as experiments/quickstart.yaml)",
                          source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset {exc.start}); an "
                          "experiment file is YAML text, see experiments/quickstart.yaml", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not an experiment file (pass a path such as experiments/quickstart.yaml)",
                          source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror or exc})", source=source) from None
    return parse_experiment(text, source=source, check_task=check_task)


def parse_experiment(text: str, *, source: str = "<string>", check_task: bool = True) -> Experiment:
    """Validate experiment YAML given as text (see :func:`load_experiment`)."""
    data, lines = _compose(text, source)
    try:
        return _validate(data, source, check_task)
    except _Problem as problem:
        raise ConfigError(problem.message, source=source, line=_line_of(lines, problem.path),
                          key=_dotted(problem.path)) from None


def _compose(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """Python data and the line of every key path (duplicate keys are errors, not silently merged)."""
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters (a binary file)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not YAML text: {' '.join(str(exc).split())}", source=source) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("the file is empty; see experiments/quickstart.yaml for an example", source=source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark is not None and exc.problem_mark is not None \
                and exc.context_mark.line != exc.problem_mark.line:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error: {problem}", source=source,
                          line=mark.line + 1 if mark is not None else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source=source) from None
    finally:
        loader.dispose()
    lines: dict[Path_, int] = {}
    walked: set[int] = set()  # an alias (*a) reuses its anchor's node: walk each node once, or nested aliases
    # (a 400-byte "billion laughs" file) multiply into billions of paths; an error under an alias names the alias's line

    def walk(n: yaml.Node, path: Path_) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if id(n) in walked:
            return
        walked.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in n.value:
                key = key_node.value
                if key in seen:
                    raise ConfigError(f"duplicate key {key!r} (YAML would silently keep the last one)",
                                      source=source, line=key_node.start_mark.line + 1, key=_dotted(path + (key,)))
                seen.add(key)
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (i,))

    walk(node, ())
    return data, lines


def _line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- validation ------------------------------------------------------------------------------------


def _validate(data: Any, source: str, check_task: bool) -> Experiment:
    if not isinstance(data, dict):
        raise _Problem((), f"the file must be a mapping of keys (name, task, arms, ...), got {_kind(data)}")
    _no_unknown(data, TOP_KEYS, ())
    name = _required(data, "name", ())
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _Problem(("name",), f"must be a name of letters, digits, '_', '-' or '.', got {name!r}")

    task = _task(data.get("task", None) if "task" in data else _required(data, "task", ()))
    program = data.get("program")
    if program is not None and not isinstance(program, str):
        raise _Problem(("program",), f"must be the name of one of the task's programs, got {_kind(program)}")
    if check_task:
        _check_task(task, program)
    model = data.get("model", "tiny")
    embedded_names = ("tiny", "agent")  # embedded.MODELS (not imported here: loading a file imports no torch)
    if not isinstance(model, str) or not model:
        raise _Problem(("model",), f"must be one of {embedded_names} or a local model folder, got {model!r}")
    if model not in embedded_names and not Path(model).expanduser().exists():
        raise _Problem(("model",), f"model folder {model!r} does not exist (the embedded models: {embedded_names})")
    engine, vllm = _engine(data)
    metric = data.get("metric", "rubric")
    if isinstance(metric, str) and metric.endswith(".json"):
        if not Path(metric).is_file():
            raise _Problem(("metric",), f"calibrated rubric file {metric!r} does not exist (`cotune calibrate` writes "
                                        "one)")
    elif not isinstance(metric, str) or not (metric in ("rubric", "gold") or re.fullmatch(r"[\w.]+:[\w.]+", metric)):
        raise _Problem(("metric",), f"must be 'rubric', 'gold', 'package.module:name' or a calibrated rubric file "
                                    f"(.json), got {metric!r}")
    if ":" in metric:
        _import(metric, ("metric",))

    arms = _arms(_required(data, "arms", ()))
    seeds = _seeds(data.get("seeds", [0]))
    budget = _budget(data.get("budget"))
    data_cfg = _data(data.get("data", {}))
    prompt = _section(data, "prompt", _stage_cls("prompt"))
    weights = _section(data, "weights", _stage_cls("weights"), sentinel={"max_rollouts": 10**9})
    self_training = _section(data, "self_training", _stage_cls("self_training"))
    lora = _section(data, "lora", _lora_cls())
    eval_cfg = _plain_section(data, "eval", EVAL_KEYS, {"threads": int, "max_tokens": int})
    tracking = _plain_section(data, "tracking", TRACKING_KEYS, {"uri": str, "experiment": str, "artifacts": bool,
                                                                   "traces": int}, zero_ok=("traces",))
    if tracking.get("uri"):
        _check_uri(tracking["uri"], ("tracking", "uri"))
    gold = data.get("gold", True)
    if not isinstance(gold, bool):
        raise _Problem(("gold",), f"must be true or false, got {gold!r}")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise _Problem(("threads",), f"must be a positive integer (torch CPU threads), got {threads!r}")
    for key in ("description", "output_dir", "report_dir"):
        if key in data and not isinstance(data[key], str):
            raise _Problem((key,), f"must be a string, got {_kind(data[key])}")
    tune = _tune(data["tune"], name) if "tune" in data else None
    traces = tracking.get("traces", 4)  # checked above: an int >= 0 (traces per stage; 0: none)
    return Experiment(
        name=name, task=task, program=program, model=model, engine=engine, vllm=vllm, metric=metric, gold=gold, arms=arms, seeds=seeds,
        budget=budget, description=data.get("description", ""), data=data_cfg, prompt=prompt, weights=weights,
        self_training=self_training, lora=lora, eval=eval_cfg, tracking_uri=tracking.get("uri"),
        tracking_experiment=tracking.get("experiment"), log_artifacts=tracking.get("artifacts", True),
        traces_per_stage=traces,
        output_dir=data.get("output_dir"), report_dir=data.get("report_dir"), threads=threads, tune=tune, source=source)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), f"{type(value).__name__} {value!r}")


def _required(data: dict, key: str, path: Path_) -> Any:
    if key not in data or data[key] is None:
        raise _Problem(path + (key,), "is required")
    return data[key]


def _no_unknown(data: dict, allowed, path: Path_) -> None:
    for key in data:
        if key not in allowed:
            hint = _close(key, allowed)
            raise _Problem(path + (key,), f"unknown key{hint}; allowed keys here: {', '.join(map(str, allowed))}")


def _close(key: Any, allowed) -> str:
    import difflib

    match = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _task(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        _no_unknown(value, ("name", "options"), ("task",))
        if not isinstance(value.get("name"), str):
            raise _Problem(("task", "name"), "is required (a registered task name)")
        options = value.get("options") or {}
        if not isinstance(options, dict):
            raise _Problem(("task", "options"), f"must be a mapping, got {_kind(options)}")
        return {"name": value["name"], "options": options}
    raise _Problem(("task",), f"must be a task name or {{name: ..., options: {{...}}}}, got {_kind(value)}")


def _check_task(task: str | dict, program: str | None) -> None:
    from experiments.tasks import TaskLookupError, resolve_task

    try:
        resolved = resolve_task(task)
    except TaskLookupError as exc:
        key = ("task",) if isinstance(task, str) else ("task", "options" if exc.kind == "options" else "name")
        raise _Problem(key, str(exc)) from None
    if program is not None and program not in resolved.programs:
        raise _Problem(("program",), f"task {resolved.name!r} has no program {program!r}; its programs are "
                                     f"{sorted(resolved.programs)}")


def _import(spec: str, path: Path_) -> Any:
    from metrics.references import ReferenceImportError

    try:
        return import_metric(spec)
    except ReferenceImportError as exc:
        raise _Problem(path, str(exc)) from None


# --- module:attr references: code execution, from installed packages only ------------------------------
# What may be imported, and why: metrics.references.import_reference (imported where used: metrics imports dspy,
# which validating a file does not need).


def import_metric(spec: str) -> Any:
    """A metric reference: a :class:`metrics.Rubric`, a metric ``(example, pred, trace=None)`` or a factory of
    one taking no arguments (see :func:`metrics.references.import_reference` for what may be imported).

    Raises:
        ReferenceImportError: see :func:`metrics.references.import_reference`; or the object is no metric.
    """
    from metrics import Rubric
    from metrics.references import ReferenceImportError, import_reference

    obj = import_reference(spec)
    if isinstance(obj, Rubric):
        return obj
    if not callable(obj):
        raise ReferenceImportError(f"{spec!r} is not callable (a metric, a Rubric or a function returning one)")
    params = _parameters(obj)
    if params is None:
        return obj
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    takes_two = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)
    if required and (len(required) > 3 or not takes_two):
        raise ReferenceImportError(f"{spec!r} is not a metric: a metric takes (example, pred, trace=None), or "
                                   f"nothing (a factory returning one); its parameters are {[p.name for p in params]}")
    return obj


def build_metric(spec: str) -> Any:
    """The metric a reference names, ready to call: :func:`import_metric`'s object, with a factory (a callable
    that needs no argument) called once to build the metric.

    Raises:
        ReferenceImportError: see :func:`import_metric`.
    """
    from metrics import Rubric

    obj = import_metric(spec)
    if isinstance(obj, Rubric):
        return obj
    params = _parameters(obj)
    if params is None:
        return obj
    required = [p for p in params
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return obj() if not required else obj


def _parameters(obj: Any) -> list[inspect.Parameter] | None:
    """``obj``'s parameters, or ``None`` where Python cannot tell (some builtins and C callables)."""
    try:
        return list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return None


def _arms(value: Any) -> tuple[Arm, ...]:
    from optimizers.schedule import ScheduleError, arm_of, format_schedule, parse_schedule

    items: list[tuple[str | None, Any, Path_]]
    if isinstance(value, dict):
        items = [(str(k), v, ("arms", k)) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(None, v, ("arms", i)) for i, v in enumerate(value)]
    else:
        raise _Problem(("arms",), f"must map arm names to schedules (joint: 'p -> w') or list schedules, "
                                  f"got {_kind(value)}")
    if not items:
        raise _Problem(("arms",), "needs at least one arm")
    arms: list[Arm] = []
    for name, schedule, path in items:
        prompt: dict[str, Any] = {}
        if isinstance(schedule, dict):  # {schedule: "p", prompt: {optimizer: random_demos}}
            _no_unknown(schedule, ("schedule", "prompt"), path)
            prompt = _section(schedule, "prompt", _stage_cls("prompt"), path=path)
            schedule = _required(schedule, "schedule", path)
        if not isinstance(schedule, str):
            raise _Problem(path, f"a schedule is a string like 'p -> w' (or {{schedule: ..., prompt: {{...}}}}), "
                                 f"got {_kind(schedule)}")
        try:
            stages = parse_schedule(schedule)
        except ScheduleError as exc:
            raise _Problem(path, str(exc)) from None
        arms.append(Arm(name=name or arm_of(stages), schedule=format_schedule(stages), prompt=prompt))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        if isinstance(value, list):  # several schedules of one arm kind: name them by their schedule
            arms = [Arm(name=a.schedule, schedule=a.schedule, prompt=a.prompt) for a in arms]
        if len({a.name for a in arms}) != len(arms):
            raise _Problem(("arms",), f"arm names must be unique, got {names}")
    for i, message in check_arm_folders([a.name for a in arms]):
        raise _Problem(items[i][2], message)
    return tuple(arms)


def _seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise _Problem(("seeds",), f"must be a list of integers or a count, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise _Problem(("seeds",), f"a count of seeds must be >= 1, got {value}")
        return tuple(range(value))
    if not isinstance(value, list) or not value:
        raise _Problem(("seeds",), f"must be a non-empty list of integers or a count, got {_kind(value)}")
    for i, s in enumerate(value):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise _Problem(("seeds", i), f"a seed is an integer >= 0, got {s!r}")
    if len(set(value)) != len(value):
        raise _Problem(("seeds",), f"seeds must be distinct, got {value}")
    return tuple(value)


def _budget(value: Any) -> int | dict[str, int] | None:
    from optimizers.budget import Budget, BudgetError

    if value is None:
        return None
    if isinstance(value, dict):
        _no_unknown(value, ("rollouts", "lm_calls"), ("budget",))
        for key, v in value.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _Problem(("budget", key), f"must be a positive integer, got {v!r}")
    elif not isinstance(value, int) or isinstance(value, bool):
        raise _Problem(("budget",), f"must be rollouts (an integer) or {{rollouts: R, lm_calls: C}}, got {_kind(value)}")
    try:
        Budget.coerce(value)
    except BudgetError as exc:
        raise _Problem(("budget",), str(exc)) from None
    return value


def _data(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _Problem(("data",), f"must be a mapping like {{train: 32, val: 32}}, got {_kind(value)}")
    _no_unknown(value, tuple(DATA_KEYS), ("data",))
    out = dict(DATA_KEYS)
    for key, v in value.items():
        minimum = 1 if key in ("train", "val") else 0
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise _Problem(("data", key), f"must be an integer >= {minimum}, got {v!r}")
        out[key] = v
    return out


def _stage_cls(section: str) -> type:
    """The config class of the stage kind whose YAML section is ``section``, from the stage registry (imported when
    first needed: it loads torch, which ``cotune --help`` and a YAML typo should not wait for)."""
    from optimizers.stages import sections

    return sections()[section]


def _lora_cls():
    from rl.policy import LoraSettings

    return LoraSettings


def _section(data: dict, key: str, cls, sentinel: dict[str, Any] | None = None, path: Path_ = ()) -> dict[str, Any]:
    """A config section checked against ``cls``'s fields and its own validation (``__post_init__``); ``path`` is
    where ``data`` sits in the file (an arm's own section)."""
    value = data.get(key) or {}
    where = (*path, key)
    if not isinstance(value, dict):
        raise _Problem(where, f"must be a mapping of {cls.__name__} settings, got {_kind(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(value, tuple(fields), where)
    out = {name: coerce_field(fields[name], v, (*where, name)) for name, v in value.items()}
    check_dataclass(cls, out, where, sentinel)
    return out


def coerce_field(f: dataclasses.Field, value: Any, path: Path_) -> Any:
    """A YAML value for a dataclass field, typed by the field's default (numeric strings become floats)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _Problem(path, f"must be true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Problem(path, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Problem(path, f"must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Problem(path, f"must be an integer, got {value!r}")
    elif f.name == "target_modules" and isinstance(value, list):
        return tuple(value)
    return value


def check_dataclass(cls, values: dict[str, Any], path: Path_, sentinel: dict[str, Any] | None = None) -> None:
    """Build ``cls(**values)`` to run its own checks; blame the field its message names (else the section)."""
    try:
        cls(**{**(sentinel or {}), **values})
    except (TypeError, ValueError) as exc:
        message = str(exc)
        blamed = next((name for name in values if re.search(rf"\b{re.escape(name)}\b", message)), None)
        raise _Problem(path + ((blamed,) if blamed else ()), message) from None


def _plain_section(data: dict, key: str, allowed, types: dict[str, type], zero_ok: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise _Problem((key,), f"must be a mapping with keys {', '.join(allowed)}, got {_kind(value)}")
    _no_unknown(value, allowed, (key,))
    for name, v in value.items():
        expected, low = types[name], 0 if name in zero_ok else 1
        if not isinstance(v, expected) or (expected is int and (isinstance(v, bool) or v < low)):
            what = ("an int >= 0" if low == 0 else "a positive integer") if expected is int else expected.__name__
            raise _Problem((key, name), f"must be {what}, got {v!r}")
    return dict(value)


def _engine(data: dict) -> tuple[str, dict[str, Any]]:
    """``engine`` and its ``vllm`` options, checked against the signatures they are passed to."""
    import inspect

    from rl.vllm_server import VLLMServer

    engine = data.get("engine", "local")
    if not isinstance(engine, str) or not (engine in ("local", "vllm") or re.fullmatch(r"https?://\S+", engine)):
        raise _Problem(("engine",), f"must be 'local', 'vllm' (start a vLLM server) or the http(s):// URL of a "
                                    f"running vLLM server, got {engine!r}")
    vllm = data.get("vllm") or {}
    if not isinstance(vllm, dict):
        raise _Problem(("vllm",), f"must be a mapping of vLLM server options, got {_kind(vllm)}")
    if vllm and engine == "local":
        raise _Problem(("vllm",), "is set but engine is 'local'; set engine: vllm (or a server URL) to use it")
    target = VLLMServer.start if engine == "vllm" else VLLMServer.attach
    allowed = tuple(n for n, p in inspect.signature(target).parameters.items()
                    if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("cls", "url", "model_path")))
    _no_unknown(vllm, allowed + ("adapter_dir", "allow_unchecked_args")
                + (("allow_custom_python",) if "python" in allowed else ()), ("vllm",))
    vllm = dict(vllm)
    allow_custom, allow_args = vllm.pop("allow_custom_python", False), vllm.pop("allow_unchecked_args", False)
    for key, flag in (("allow_custom_python", allow_custom), ("allow_unchecked_args", allow_args)):
        if not isinstance(flag, bool):
            raise _Problem(("vllm", key), f"must be true or false, got {flag!r}")
    if not allow_args:
        _check_vllm_args(vllm)
    if "python" in vllm:
        _check_vllm_python(vllm["python"], allow_custom)
    elif allow_custom:
        raise _Problem(("vllm", "allow_custom_python"), "is set but vllm.python is not; it allows a python other "
                                                        "than the vLLM venv that scripts/vllm_venv.sh builds")
    return engine, vllm


# `vllm serve` flags that size or tune the engine and load no code (vLLM 0.32); others (--trust-remote-code,
# --middleware, --tool-parser-plugin, --logits-processors, ...) can import a module or run a model's own code
SAFE_SERVE_FLAGS = frozenset({
    "--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size", "--gpu-memory-utilization",
    "--max-num-seqs", "--max-num-batched-tokens", "--swap-space", "--block-size", "--quantization", "--kv-cache-dtype",
    "--max-cpu-loras", "--cpu-offload-gb", "--enable-prefix-caching", "--no-enable-prefix-caching", "--max-logprobs",
    "--disable-log-requests", "--disable-log-stats", "--uvicorn-log-level", "--max-seq-len-to-capture",
    "-tp", "-pp", "-dp",
})
# environment variables that make a process load code or libraries it was not given: the loader's and Python's own
# (PYTHONWARNINGS imports the warning categories it names, PYTHONPYCACHEPREFIX reads bytecode from another tree), and
# vLLM's plugins and logging config (VLLM_LOGGING_CONFIG_PATH goes to logging.config.dictConfig, which imports any
# callable the file names)
CODE_ENV = re.compile(r"LD_\w+|DYLD_\w+|PYTHON(PATH|STARTUP|HOME|USERBASE|INSPECT|BREAKPOINT|EXECUTABLE|WARNINGS|"
                      r"PYCACHEPREFIX)|BASH_ENV|ENV|VLLM_PLUGINS|VLLM_\w*(PLUGIN|MODULE|CLASS)\w*|"
                      r"VLLM_LOGGING_CONFIG_PATH")


def _check_vllm_args(vllm: dict[str, Any]) -> None:
    """``extra_args`` and ``env`` cannot make the server run code a shared file names, unless allowed."""
    hint = "; the server could import code through it, so that needs `allow_unchecked_args: true` beside it"
    args = vllm.get("extra_args", ())
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise _Problem(("vllm", "extra_args"), f"must be a list of strings, got {_kind(args)}")
    for arg in args:
        flag = arg.split("=", 1)[0]
        if re.match(r"--?[A-Za-z]", flag) and flag not in SAFE_SERVE_FLAGS:  # a flag, not a value such as -1
            raise _Problem(("vllm", "extra_args"), f"{flag!r} is not one of the checked vLLM flags "
                                                   f"({', '.join(sorted(SAFE_SERVE_FLAGS))}){hint}")
    env = vllm.get("env") or {}
    if not isinstance(env, dict):
        raise _Problem(("vllm", "env"), f"must be a mapping of environment variables, got {_kind(env)}")
    for name in env:
        if CODE_ENV.fullmatch(str(name)):
            raise _Problem(("vllm", "env", name), f"{name} makes a process load code or libraries{hint}")


def _check_vllm_python(python: Any, allow_custom: bool) -> None:
    """``vllm.python`` is an executable cotune runs: the venv ``scripts/vllm_venv.sh`` builds, unless allowed."""
    from rl.vllm_server import venv_dir

    if not isinstance(python, str) or not python:
        raise _Problem(("vllm", "python"), f"must be the path of a python executable, got {_kind(python)}")
    if allow_custom:
        return
    expected = venv_dir() / "bin" / "python"
    trusted = {os.path.abspath(expected)}
    if os.environ.get("COTUNE_VLLM_PYTHON"):  # chosen in the environment, not in a shareable file
        trusted.add(os.path.abspath(os.path.expanduser(os.environ["COTUNE_VLLM_PYTHON"])))
    if os.path.abspath(os.path.expanduser(python)) not in trusted:
        raise _Problem(("vllm", "python"), f"{python!r} is not the vLLM venv's python ({expected}, built by "
                                           "scripts/vllm_venv.sh); cotune would run this executable, so another "
                                           "one needs `allow_custom_python: true` beside it (or leave python out)")


def _check_uri(uri: str, path: Path_) -> None:
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme in ("file", "") or uri.startswith("./") or uri.startswith("/"):
        raise _Problem(path, f"{uri!r} is a file store, which MLflow 3 no longer accepts; use "
                             "sqlite:///path/mlflow.db or an http(s):// tracking server")


def _tune(value: Any, name: str) -> TuneSpec:
    if not isinstance(value, dict):
        raise _Problem(("tune",), f"must be a mapping (storage, space, ...), got {_kind(value)}")
    _no_unknown(value, TUNE_KEYS, ("tune",))
    study = value.get("study", name)
    if not isinstance(study, str) or not study:
        raise _Problem(("tune", "study"), f"must be a name, got {study!r}")
    storage = value.get("storage")
    if storage is not None and (not isinstance(storage, str) or ":" not in storage):
        raise _Problem(("tune", "storage"), f"must be a database URL (sqlite:///optuna.db, postgresql+psycopg://...) "
                                            f"or journal:PATH, got {storage!r}")
    seed = value.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise _Problem(("tune", "seed"), f"must be an integer >= 0, got {seed!r}")
    trials = value.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise _Problem(("tune", "trials"), f"must be a positive integer, got {trials!r}")
    direction = value.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise _Problem(("tune", "direction"), f"must be 'maximize' or 'minimize', got {direction!r}")
    sampler = _typed(value.get("sampler", {"type": "tpe"}), ("tune", "sampler"), SAMPLERS,
                     {"tpe": ("type", "seed", "n_startup_trials"), "random": ("type", "seed")})
    pruner = _typed(value.get("pruner", {"type": "median"}), ("tune", "pruner"), PRUNERS,
                    {"median": ("type", "n_startup_trials", "n_warmup_steps"),
                     "percentile": ("type", "percentile", "n_startup_trials", "n_warmup_steps"), "none": ("type",)})
    space_value = value.get("space")
    if not isinstance(space_value, dict) or not space_value:
        raise _Problem(("tune", "space"), "is required: a mapping of parameters to search, e.g. "
                                          "{schedule: {choices: ['p -> w', 'w -> p']}}")
    space: dict[str, dict[str, Any]] = {}
    for key, spec in space_value.items():
        path = ("tune", "space", key)
        hint = _check_space_key(str(key), path)
        try:
            param = parse_param(str(key), spec, hint)
        except TuneError as exc:
            raise _Problem(path, str(exc)) from None
        _check_space_values(param, path)
        space[str(key)] = _normalized(param)
    enqueue = value.get("enqueue") or []
    if not isinstance(enqueue, list):
        raise _Problem(("tune", "enqueue"), f"must be a list of parameter mappings, got {_kind(enqueue)}")
    for i, params in enumerate(enqueue):
        if not isinstance(params, dict):
            raise _Problem(("tune", "enqueue", i), f"must be a mapping of space parameters, got {_kind(params)}")
        for key in params:
            if key not in space:
                raise _Problem(("tune", "enqueue", i, key), f"is not a parameter of tune.space ({', '.join(space)})")
    return TuneSpec(study=study, storage=storage, seed=seed, direction=direction, sampler=sampler, pruner=pruner,
                    space=space, enqueue=[dict(p) for p in enqueue], trials=trials)


def _typed(value: Any, path: Path_, kinds: tuple[str, ...], keys: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise _Problem(path, f"must be a type name ({', '.join(kinds)}) or a mapping with 'type', got {_kind(value)}")
    kind = value.get("type", kinds[0])
    if kind not in kinds:
        raise _Problem(path + ("type",), f"must be one of {', '.join(kinds)}, got {kind!r}")
    _no_unknown(value, keys[kind], path)
    for key, v in value.items():
        if key != "type" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise _Problem(path + (key,), f"must be a number >= 0, got {v!r}")
    return {"type": kind, **{k: v for k, v in value.items() if k != "type"}}


SPACE_SECTIONS = {**{name: functools.partial(_stage_cls, name) for name in ("prompt", "weights", "self_training")},
                  "lora": _lora_cls}


def _check_space_key(key: str, path: Path_) -> str | None:
    """Check a search parameter's name; return the type of its range ("int"/"float") from the field's default."""
    if key == "schedule":
        return None
    if key == "budget":
        return "int"
    section, _, leaf = key.partition(".")
    if section not in SPACE_SECTIONS or not leaf:
        raise _Problem(path, "a search parameter is 'schedule', 'budget' or SECTION.FIELD with SECTION one of "
                             f"{', '.join(SPACE_SECTIONS)} (e.g. weights.learning_rate, lora.r)")
    fields = {f.name: f for f in dataclasses.fields(SPACE_SECTIONS[section]())}
    if leaf not in fields:
        raise _Problem(path, f"{section} has no setting {leaf!r}{_close(leaf, fields)}")
    default = fields[leaf].default
    if isinstance(default, bool):
        return None
    return "int" if isinstance(default, int) else "float" if isinstance(default, float) else None


def _normalized(param: Param) -> dict[str, Any]:
    if param.kind == "categorical":
        return {"choices": list(param.choices)}
    out = {"type": param.kind, "low": param.low, "high": param.high, "log": param.log}
    if param.step is not None:
        out["step"] = param.step
    return out


def _check_space_values(param: Param, path: Path_) -> None:
    from optimizers.schedule import ScheduleError, parse_schedule

    if param.name == "schedule":
        if param.choices is None:
            raise _Problem(path, "schedule is searched among choices: {choices: ['p -> w', 'w -> p']}")
        for i, choice in enumerate(param.choices):
            try:
                parse_schedule(choice)
            except ScheduleError as exc:
                raise _Problem(path + ("choices", i), str(exc)) from None


def describe(exp: Experiment) -> str:
    """One line per arm, what `cotune run` is about to do."""
    arms = ", ".join(f"{a.name} ({a.schedule})" for a in exp.arms)
    return (f"experiment {exp.name!r}: task {exp.task_name}, model {exp.model}, arms {arms}, seeds "
            f"{list(exp.seeds)}, budget {exp.budget} rollouts per run")
