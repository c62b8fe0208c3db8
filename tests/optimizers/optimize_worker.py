"""Worker of tests/optimizers/test_optimize_distributed.py: one ``optimize()`` call, run by every rank.

``OUT MODEL SCHEDULE BUDGET [--crash-at K] [--resume]``: every rank runs ``optimize()`` on ``last_digit`` with the
same arguments and the run folder ``OUT/run``, then writes ``OUT/rank<r>.json`` (the history it returned, the hash of
its program state and of its live adapter, the callback events it saw, the error it raised if any) and
``OUT/rank<r>-adapter.safetensors``. ``--crash-at K``: a callback raises when stage K starts (on rank 0, the only
rank that holds callbacks). ``--engine URL``: every rank generates on one shared vLLM server. Exits 1 when
``optimize()`` raised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from optimizers import OptimizeCallback, optimize
from optimizers.result import program_state
from programs.tasks import last_digit
from rl import Policy, distributed
from rl.policy import zero3_lora_params

WEIGHTS = {"learning_rate": 1e-3, "max_tokens": 16, "num_generations": 4, "examples_per_step": 4}
PROMPT = {"num_candidate_programs": 2, "max_bootstrapped_demos": 3, "num_threads": 4}
SELF_TRAIN = {"num_samples": 4, "temperature": 1.0, "learning_rate": 1e-3, "epochs": 1, "batch_size": 8}


class Recorder(OptimizeCallback):
    def __init__(self, crash_at: int | None) -> None:
        self.events: list[list] = []
        self.crash_at = crash_at

    def on_run_start(self, run) -> None:
        self.events.append(["run_start"])

    def on_stage_start(self, run, index, stage) -> None:
        self.events.append(["stage_start", index, stage])
        if index == self.crash_at:
            raise RuntimeError(f"crash at stage {index}")

    def on_step(self, run, index, metrics) -> None:
        self.events.append(["step", index, int(metrics["step"])])

    def on_stage_end(self, run, record) -> None:
        self.events.append(["stage_end", record.index])

    def on_run_end(self, run, result) -> None:
        self.events.append(["run_end"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("model")
    parser.add_argument("schedule")
    parser.add_argument("budget", type=int)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--engine", default="local")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = distributed.rank()
    policy = Policy.from_pretrained(args.model, name="tiny", device="cpu", engine=args.engine)
    recorder = Recorder(args.crash_at)
    report: dict = {"rank": rank, "world": distributed.world_size()}
    code = 0
    try:
        result = optimize(last_digit.predict_program(), last_digit.load("train", 24), last_digit.load("val", 8),
                          metric=last_digit.correct, policy=policy, schedule=args.schedule, prompt=PROMPT,
                          weights=WEIGHTS, self_training=SELF_TRAIN, budget=args.budget, seed=0,
                          output_dir=args.out / "run", resume=args.resume, overwrite=not args.resume,
                          progress=False, eval_threads=4, callbacks=[recorder])
        report.update(
            history=[{"name": r.name, "val_score": r.val_score, "spend": r.spend, "total_spend": r.total_spend,
                      "adapter_version": r.adapter_version, "details": {k: r.details.get(k) for k in
                                                                        ("steps", "rollouts", "kept_rollouts", "rows")}}
                     for r in result.history],
            best_index=result.best_index,
            program=hashlib.sha256(json.dumps(program_state(result.program), sort_keys=True,
                                              default=str).encode()).hexdigest(),
            last_program=hashlib.sha256(json.dumps(program_state(result.last_program), sort_keys=True,
                                                   default=str).encode()).hexdigest(),
            version=policy.version, model_string=policy.model_string,
            partitioned=bool(zero3_lora_params(policy.model)))
        if args.engine != "local":
            report.update(swaps=policy.engine.swaps, served=policy.engine.served_adapters(),
                          current=policy.engine.adapter_name())
    except Exception as exc:  # noqa: BLE001 - recorded for the test, then a failing exit code
        report["error"] = {"type": type(exc).__name__, "message": str(exc)}
        code = 1
    report["events"] = recorder.events
    save_file(policy.adapter_state(), args.out / f"rank{rank}-adapter.safetensors")
    (args.out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
