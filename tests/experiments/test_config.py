"""Experiment files: the schema accepts ours and names the file, line and key of every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.config import ConfigError, load_experiment, parse_experiment

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml"))

GOOD = """\
name: demo
task: last_digit
arms:
  prompt-only: "p"
  joint: "p->w"
seeds: 2
budget: 400
weights:
  learning_rate: 1e-3
"""


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_file_is_valid(path):
    exp = load_experiment(path)
    assert exp.arms and exp.seeds and exp.name


def test_quickstart_compares_its_arms_and_a_random_demos_control_at_equal_budget_over_three_seeds():
    exp = load_experiment(Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml")
    assert [a.name for a in exp.arms] == ["prompt-only", "random-demos", "rl-only", "joint"]
    control = exp.arm("random-demos")
    assert control.schedule == "p" and control.prompt == {"optimizer": "random_demos"}
    assert len(exp.seeds) == 3 and isinstance(exp.budget, int) and exp.model == "tiny"
    assert exp.tune is not None and "schedule" in exp.tune.space


def test_good_file_is_normalised():
    exp = parse_experiment(GOOD)
    assert [(a.name, a.schedule) for a in exp.arms] == [("prompt-only", "p"), ("joint", "p -> w")]
    assert exp.seeds == (0, 1)
    assert exp.weights["learning_rate"] == 1e-3  # YAML 1.1 reads 1e-3 as a string; a float field takes it
    assert exp.data == {"train": 32, "val": 32, "test": 0, "seed": 0}


def test_list_of_schedules_names_arms_by_kind_or_schedule():
    exp = parse_experiment(GOOD.replace('  prompt-only: "p"\n  joint: "p->w"', '  - "p"\n  - "w"\n  - "p -> w"'))
    assert [a.name for a in exp.arms] == ["prompt-only", "rl-only", "joint"]
    exp = parse_experiment(GOOD.replace('  prompt-only: "p"\n  joint: "p->w"', '  - "p -> w"\n  - "w -> p"'))
    assert [a.name for a in exp.arms] == ["p -> w", "w -> p"]


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_experiment(text, source="exp.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("exp.yaml")
    return info.value


def test_an_arm_can_carry_its_own_prompt_settings():
    exp = parse_experiment(GOOD.replace('  prompt-only: "p"', '  control: {schedule: p, prompt: {optimizer: random_demos}}'))
    assert exp.arm("control").prompt == {"optimizer": "random_demos"} and exp.arm("joint").prompt == {}
    assert exp.to_dict()["arms"]["control"] == {"schedule": "p", "prompt": {"optimizer": "random_demos"}}
    with pytest.raises(ConfigError, match=r":4: arms.control.prompt.optimiser: unknown key .did you mean .optimizer"):
        parse_experiment(GOOD.replace('  prompt-only: "p"', '  control: {schedule: p, prompt: {optimiser: x}}'))
    with pytest.raises(ConfigError, match=r"arms.control.schedule: is required"):
        parse_experiment(GOOD.replace('  prompt-only: "p"', '  control: {prompt: {optimizer: random_demos}}'))


def test_yaml_syntax_error_names_the_line():
    err = error(GOOD.replace("budget: 400", "budget: [400"))
    assert err.line is not None and "YAML syntax error" in str(err)


def test_unknown_key_names_key_line_and_suggestion():
    err = error(GOOD.replace("weights:\n  learning_rate", "weights:\n  learnin_rate"))
    assert err.line == 9 and err.key == "weights.learnin_rate" and "learning_rate" in str(err)
    err = error(GOOD + "sedes: [1]\n")
    assert err.line == 10 and "did you mean 'seeds'" in str(err)


def test_bad_value_names_the_field():
    err = error(GOOD.replace("learning_rate: 1e-3", "learning_rate: -1"))
    assert err.line == 9 and err.key == "weights.learning_rate" and "> 0" in str(err)
    err = error(GOOD.replace("budget: 400", "budget: lots"))
    assert err.line == 7 and err.key == "budget"


def test_bad_schedule_names_the_arm():
    err = error(GOOD.replace('joint: "p->w"', 'joint: "p -> x"'))
    assert err.line == 5 and err.key == "arms.joint" and "unknown stage 'x'" in str(err)


def test_unknown_task_and_program_are_caught_before_running():
    err = error(GOOD.replace("task: last_digit", "task: last_digits"))
    assert err.line == 2 and err.key == "task" and "last_digit" in str(err)
    err = error(GOOD + "program: nope\n")
    assert err.line == 10 and err.key == "program" and "predict" in str(err)


def test_missing_required_key_and_duplicate_key():
    err = error(GOOD.replace("name: demo\n", ""))
    assert err.key == "name" and "required" in str(err)
    err = error(GOOD + "budget: 500\n")
    assert err.line == 10 and "duplicate key" in str(err)


def test_file_store_tracking_uri_is_refused():
    err = error(GOOD + "tracking: {uri: ./mlruns}\n")
    assert err.key == "tracking.uri" and "sqlite" in str(err)


def test_search_space_is_checked_against_the_config_fields():
    tune = "tune:\n  space:\n    weights.lerning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
    err = error(GOOD + tune)
    assert err.line == 12 and "learning_rate" in str(err)
    err = error(GOOD + "tune:\n  space:\n    weights.learning_rate: {low: 0, high: 1, log: true}\n")
    assert "log range needs low > 0" in str(err)
    err = error(GOOD + "tune:\n  space:\n    schedule: {choices: ['p', 'q']}\n")
    assert err.key == "tune.space.schedule.choices[1]"
    exp = parse_experiment(GOOD + "tune:\n  space:\n    lora.r: {low: 4, high: 16}\n    weights.beta: {low: 0, high: 1}\n")
    assert exp.tune.space["lora.r"]["type"] == "int" and exp.tune.space["weights.beta"]["type"] == "float"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")


def test_overrides_apply_dotted_settings_and_schedule():
    exp = parse_experiment(GOOD).with_overrides({"schedule": "w -> p", "weights.beta": 0.04, "lora.r": 8})
    assert [a.schedule for a in exp.arms] == ["w -> p"]
    assert exp.weights == {"learning_rate": 1e-3, "beta": 0.04} and exp.lora == {"r": 8}


def test_engine_and_vllm_options_are_checked_against_the_server_api():
    base = "name: x\ntask: last_digit\narms: {rl: w}\nbudget: 64\n"
    exp = parse_experiment(base + "engine: vllm\nvllm: {dtype: bfloat16, env: {CUDA_VISIBLE_DEVICES: '1'}}\n")
    assert (exp.engine, exp.vllm) == ("vllm", {"dtype": "bfloat16", "env": {"CUDA_VISIBLE_DEVICES": "1"}})
    exp = parse_experiment(base + "engine: http://10.0.0.2:8000\nvllm: {api_key: k, adapter_dir: /shared/a}\n")
    assert exp.engine == "http://10.0.0.2:8000" and exp.vllm["adapter_dir"] == "/shared/a"
    assert parse_experiment(base).engine == "local"
    cases = [("engine: vlm\n", "x.yaml:5: engine: must be 'local', 'vllm'"),
             ("vllm: {dtype: float32}\n", "x.yaml:5: vllm: is set but engine is 'local'"),
             ("engine: vllm\nvllm: {dtyp: float32}\n", "x.yaml:6: vllm.dtyp: unknown key (did you mean 'dtype'?)"),
             ("engine: http://h:1\nvllm: {dtype: bfloat16}\n", "vllm.dtype: unknown key; allowed keys here: "
                                                               "served_model, timeout_s, api_key, adapter_dir")]
    for text, message in cases:
        with pytest.raises(ConfigError) as err:
            parse_experiment(base + text, source="x.yaml")
        assert message in str(err.value)


def test_embedded_models_calibrated_rubrics_and_trace_samples_are_checked(tmp_path):
    assert parse_experiment(GOOD + "model: agent\n").model == "agent"
    assert "embedded models" in str(error(GOOD + "model: nowhere/model\n"))
    assert error(GOOD + "metric: calibrated/none-v1.json\n").key == "metric"
    assert parse_experiment(GOOD + "tracking: {traces: 0}\n").traces_per_stage == 0
    assert parse_experiment(GOOD).traces_per_stage == 4
    err = error(GOOD + "tracking: {traces: -2}\n")
    assert err.key == "tracking.traces" and "int >= 0" in str(err)


def _alias_bomb(depth: int) -> str:
    """Nested YAML aliases: each level lists the previous one ten times (10**depth leaves from ~40 bytes a level)."""
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, depth + 1)]
    return "\n".join(["name: bomb", *lines]) + "\n"


def test_nested_yaml_aliases_are_walked_once_not_once_per_path():
    """A 'billion laughs' file (issue 32: 461 bytes ended in a MemoryError) is an ordinary bad file."""
    from experiments.config import _compose

    _, lines = _compose(_alias_bomb(5), "<bomb>")
    assert len(lines) < 100, len(lines)  # walking every path would record over 10**5 of them
    text = _alias_bomb(9)
    assert len(text.encode()) < 600
    with pytest.raises(ConfigError, match="l0"):  # 10**9 paths: the old walk needed ~25 GB here
        parse_experiment(text, source="bomb.yaml", check_task=False)
