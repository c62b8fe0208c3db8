"""Same results from two commits: the runs a refactor must not change, side by side, with their adapters' hashes.

Why: a change that only moves code ("behaviour must not change", e.g. the stage protocol) is proven by running the
same seeded work on the commit before it and on the working tree and comparing everything the runs produce: the
val score of every stage, the spend, and the sha256 of the best adapter. Float results differ between CPUs, so the
comparison is between two commits on the same machine, never against numbers recorded elsewhere.

Each side runs, in its own process with its own checkout on ``PYTHONPATH`` (the base commit in a temporary
``git worktree``), the same list of ``optimize()`` calls through the public API:

* ``quickstart p -> w``: the tiny model on ``last_digit_long`` (the quickstart's task), a prompt stage then GRPO;
* ``self-training s``: the tiny model on ``last_digit``, one self-training stage;
* ``agent w``: the shipped agent model on ``react_tools``, GRPO with the model's own settings: the RL test's seed-0
  run (``tests/embedded/test_agent.py``) at its 2,000 episodes unless ``--agent-budget`` says less.

Both sides print the work done (runs, rollouts, LM calls, minutes); the script exits 1 when any result differs.

    python benchmarks/same_results.py --base 12b4b91 [--runs quickstart self-training agent] [--agent-budget 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("quickstart", "self-training", "agent")


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


def _one(name: str, out: Path, agent_budget: int) -> dict:
    """Run one of :data:`RUNS` in this process (whichever checkout ``PYTHONPATH`` names) and describe its result."""
    from embedded import tiny_policy
    from optimizers import optimize
    from programs.registry import get_task

    if name == "agent":
        from embedded import agent
        from rl import Policy

        task = get_task("react_tools")
        policy = Policy.from_pretrained(agent.agent_model_path(), name="agent-same")
        kwargs = dict(schedule="w", budget=agent_budget)
        train, val = task.load("train", 400, seed=0), task.load("val", 48, seed=0)
        program, metric = task.program(), task.rubric()
    else:
        task = get_task("last_digit_long" if name == "quickstart" else "last_digit")
        policy = tiny_policy()
        weights = {"learning_rate": 1e-3, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}
        if name == "quickstart":
            kwargs = dict(schedule="p -> w", budget=400, weights=weights,
                          prompt={"num_candidate_programs": 2, "max_bootstrapped_demos": 3, "num_threads": 8})
        else:
            kwargs = dict(schedule="s", budget=96, weights=weights,
                          self_training={"num_samples": 4, "temperature": 1.0, "learning_rate": 1e-3, "epochs": 1})
        train, val = task.load("train", 64, seed=0), task.load("val", 32, seed=0)
        program, metric = task.program(), task.rubric()
    start = time.perf_counter()
    result = optimize(program, train, val, metric=metric, policy=policy, seed=0, output_dir=out / name,
                      progress=False, eval_threads=8, **kwargs)
    return {"history": [(r.name, round(r.val_score, 6), r.spend) for r in result.history],
            "spend": result.spend, "best": result.history[result.best_index].name,
            "best_adapter_sha256": _sha(out / name / "best"), "last_adapter_sha256": _sha(out / name / "last"),
            "minutes": (time.perf_counter() - start) / 60}


def _side(checkout: Path, runs: list[str], agent_budget: int) -> dict:
    """Run the listed runs in a fresh process on ``checkout``'s code."""
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": "0"}
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                "sys.path.insert(0, sys.argv[2]); import same_results as s; "
                "import optimizers; out = {n: s._one(n, Path(sys.argv[3]), int(sys.argv[4])) for n in sys.argv[5:]}; "
                "print('RESULT ' + json.dumps({'code': optimizers.__file__, 'runs': out}))")
        proc = subprocess.run([sys.executable, "-c", code, str(checkout), str(ROOT / "benchmarks"), tmp,
                               str(agent_budget), *runs], cwd=checkout, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{checkout}: the runs failed:\n{proc.stderr[-4000:]}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        if not Path(result["code"]).resolve().is_relative_to(checkout.resolve()):
            raise SystemExit(f"the side meant to run {checkout} imported {result['code']}")
        return result["runs"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--agent-budget", type=int, default=2000,
                        help="episodes of the agent run (2000: the RL test's seed-0 run, tests/embedded/test_agent.py)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-results-base-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            sides = {f"base {args.base}": _side(base, args.runs, args.agent_budget),
                     "working tree": _side(ROOT, args.runs, args.agent_budget)}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)
    (before, after) = sides.values()
    differ = []
    for name in args.runs:
        for side, results in sides.items():
            r = results[name]
            print(f"{name:14s} {side:22s} spend {r['spend']} in {r['minutes']:.1f} min; best {r['best']}; "
                  f"adapters best {r['best_adapter_sha256'][:16]} last {r['last_adapter_sha256'][:16]}; val {[(n, v) for n, v, _ in r['history']]}")
        keys = ("history", "spend", "best", "best_adapter_sha256", "last_adapter_sha256")
        same = all(before[name][k] == after[name][k] for k in keys)
        differ += [] if same else [name]
        print(f"{name:14s} {'SAME' if same else 'DIFFERENT'}")
    print("all runs identical" if not differ else f"differ: {', '.join(differ)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
