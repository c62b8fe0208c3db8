"""What logging rollouts as MLflow traces costs a run: the same ``optimize()`` with traces off and at the default.

Both sides run the same ``p -> w`` on the embedded tiny model at the quickstart's scale (64 train / 48 val examples,
600 rollouts; same seed, budget, data: equal work, printed as rollouts and LM calls) into their own sqlite MLflow store; one with ``traces_per_stage=0``, one with the default
(:data:`experiments.tracking.DEFAULT_TRACES_PER_STAGE`). Rounds alternate the order. A stage builds its traces
(spans, attached feedback) on its own thread and MLflow's export thread writes them, so what they cost shows in the
stages' time. Printed: per round, the stages' time and wall time of both runs and the seconds the stages spent
logging traces; the last line is the ratio of the median stage time with traces to without (target <= 1.05).

    python benchmarks/trace_overhead.py [--rounds 3] [--budget 600]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from embedded import tiny_model_path
from experiments.tracking import DEFAULT_TRACES_PER_STAGE, MlflowTracking
from optimizers import optimize
from programs.tasks import last_digit
from rl import Policy


def one_run(traces: int, budget: int, folder: Path) -> tuple[float, float, float, dict]:
    policy = Policy.from_pretrained(tiny_model_path(), name="bench", seed=0)
    tracker = MlflowTracking(f"sqlite:///{folder / 'mlflow.db'}", "trace-overhead", traces_per_stage=traces)
    start = time.perf_counter()
    result = optimize(last_digit.predict_program(), last_digit.load("train", 64), last_digit.load("val", 48),
                      metric=last_digit.rubric(), policy=policy, schedule="p -> w", budget=budget, seed=0,
                      output_dir=folder / "run", progress=False, callbacks=[tracker])
    wall = time.perf_counter() - start
    stages = sum(r.seconds for r in result.history)
    return wall, stages, sum(tracker.trace_seconds.values()), {"rollouts": result.spend["rollouts"],
                                                               "lm_calls": result.spend["lm_calls"],
                                                               "traces": sum(map(len, tracker.traces.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=600)
    args = parser.parse_args()
    logging.getLogger("dspy.evaluate.evaluate").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    shares, walls, stage_time = [], {0: [], DEFAULT_TRACES_PER_STAGE: []}, {0: [], DEFAULT_TRACES_PER_STAGE: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [0, DEFAULT_TRACES_PER_STAGE] if r % 2 == 0 else [DEFAULT_TRACES_PER_STAGE, 0]
            for traces in order:
                wall, stages, tracing, work = one_run(traces, args.budget, Path(tmp) / f"{r}-{traces}")
                walls[traces].append(wall)
                stage_time[traces].append(stages)
                if traces:
                    shares.append(tracing / stages)
                print(f"round {r} traces_per_stage={traces}: wall {wall:.1f} s, stages {stages:.1f} s, trace "
                      f"logging {tracing:.2f} s | work: {work['rollouts']} rollouts, {work['lm_calls']} LM calls, "
                      f"{work['traces']} traces", flush=True)
    off, on = statistics.median(walls[0]), statistics.median(walls[DEFAULT_TRACES_PER_STAGE])
    print(f"wall: traces off {off:.1f} s, on {on:.1f} s; trace logging / stage time {statistics.median(shares):.1%}")
    s_off, s_on = statistics.median(stage_time[0]), statistics.median(stage_time[DEFAULT_TRACES_PER_STAGE])
    print(f"stage time with traces / without = {s_on / s_off:.2f} (median {s_on:.1f} s vs {s_off:.1f} s over "
          f"{args.rounds} rounds) at traces_per_stage={DEFAULT_TRACES_PER_STAGE} (target <= 1.05)")


if __name__ == "__main__":
    main()
