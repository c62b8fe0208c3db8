"""Worker of tests/optimizers/test_optimize_distributed.py: one ``optimize()`` call, run by every rank.

``OUT MODEL SCHEDULE BUDGET [--crash-at K] [--resume]``: every rank runs ``optimize()`` on ``last_digit`` with the
same arguments and the run folder ``OUT/run``, then writes ``OUT/rank<r>.json`` (the history it returned, the hash of
its program state and of its live adapter, the callback events it saw, the error it raised if any) and
``OUT/rank<r>-adapter.safetensors``. ``--crash-at K``: a callback raises when stage K starts (on rank 0, the only
rank that holds callbacks). ``--engine URL``: every rank generates on one shared vLLM server. Exits 1 when
``optimize()`` raised.

Used alone by tests/optimizers/test_reliability.py: ``--kill-at KIND:STAGE[:N]`` sends SIGKILL to this process at
the N-th metric call of stage STAGE (``metric``, e.g. inside a prompt stage), at step N of stage STAGE (``step``, a
weight stage) or right after stage STAGE was saved (``stage_end``, between stages). ``--deterministic``: one thread
everywhere (rollouts, prompt optimizer, evaluation), so that a resumed run can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
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
    def __init__(self, crash_at: int | None, kill_at: str | None = None) -> None:
        self.events: list[list] = []
        self.crash_at = crash_at
        kind, stage, n = ((kill_at or "none:-1") + ":0").split(":")[:3]
        self.kill_kind, self.kill_stage, self.kill_n = kind, int(stage), int(n)
        self.stage: int | None = None
        self.metric_calls = 0

    def on_run_start(self, run) -> None:
        self.events.append(["run_start"])

    def on_stage_start(self, run, index, stage) -> None:
        self.events.append(["stage_start", index, stage])
        self.stage = index
        if index == self.crash_at:
            raise RuntimeError(f"crash at stage {index}")

    def on_step(self, run, index, metrics) -> None:
        self.events.append(["step", index, int(metrics["step"])])
        if (self.kill_kind, self.kill_stage, self.kill_n) == ("step", index, int(metrics["step"])):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_stage_end(self, run, record) -> None:
        self.events.append(["stage_end", record.index])
        if (self.kill_kind, self.kill_stage) == ("stage_end", record.index):
            os.kill(os.getpid(), signal.SIGKILL)

    def metric(self):
        """``last_digit.correct``, counting its calls to kill the process inside a stage (``--kill-at metric:...``)."""

        @functools.wraps(last_digit.correct)
        def correct(example, pred, trace=None):
            if self.kill_kind == "metric" and self.stage == self.kill_stage:
                self.metric_calls += 1
                if self.metric_calls == self.kill_n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return last_digit.correct(example, pred, trace)

        return correct

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
    parser.add_argument("--kill-at")
    parser.add_argument("--deterministic", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = distributed.rank()
    policy = Policy.from_pretrained(args.model, name="tiny", device="cpu", engine=args.engine)
    recorder = Recorder(args.crash_at, args.kill_at)
    report: dict = {"rank": rank, "world": distributed.world_size()}
    code = 0
    weights, prompt, threads = WEIGHTS, PROMPT, 4
    if args.deterministic:
        weights, prompt, threads = {**WEIGHTS, "deterministic": True}, {**PROMPT, "num_threads": 1}, 1
    try:
        result = optimize(last_digit.predict_program(), last_digit.load("train", 24), last_digit.load("val", 8),
                          metric=recorder.metric(), policy=policy, schedule=args.schedule, prompt=prompt,
                          weights=weights, self_training=SELF_TRAIN, budget=args.budget, seed=0,
                          output_dir=args.out / "run", resume=args.resume, overwrite=not args.resume,
                          progress=False, eval_threads=threads, callbacks=[recorder])
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
            version=policy.version, model_string=policy.model_string, adapter_hash=policy.adapter_hash(),
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
