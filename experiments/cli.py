"""The ``cotune`` command line.

Why argparse: one small dependency-free parser whose ``--help`` is the documentation. Each subcommand is a
thin shell over the Python API; errors from cotune become a one-line message and exit code 2.

    cotune model build tiny           # build (or reuse) the embedded test model, then report its accuracy
    cotune model eval PATH            # parse rate and accuracy of any local model on the default task
"""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_model_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from programs.embedded import tiny_model_path

    if args.name != "tiny":
        raise SystemExit(f"cotune: unknown model {args.name!r}; the embedded model is 'tiny'")
    bar = None

    def progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="warm-start SFT", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    start = time.time()
    path = tiny_model_path(seed=args.seed, progress=progress, force=args.force)
    if bar is not None:
        bar.close()
    print(f"tiny model ready at {path} ({time.time() - start:.0f}s)")
    if not args.no_eval:
        _report(path, args.eval_size)
    return 0


def _cmd_model_eval(args: argparse.Namespace) -> int:
    _report(args.path, args.eval_size)
    return 0


def _report(path, n: int) -> None:
    """Greedy and sampled accuracy of a model on the default task's held-out questions."""
    from experiments.model_report import evaluate_default_task

    for row in evaluate_default_task(path, n):
        print(row)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cotune", description="Co-optimize prompts and LoRA weights of DSPy programs.")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="build or inspect local models").add_subparsers(dest="model_cmd", required=True)
    build = model.add_parser("build", help="build the embedded tiny model (cached under $COTUNE_CACHE)")
    build.add_argument("name", choices=["tiny"], help="which embedded model to build")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    build.add_argument("--no-eval", action="store_true", help="skip the accuracy report after building")
    build.add_argument("--eval-size", type=int, default=500, help="held-out questions for the report")
    build.set_defaults(func=_cmd_model_build)

    evaluate = model.add_parser("eval", help="accuracy of a local model folder on the default task")
    evaluate.add_argument("path", help="a Hugging Face model folder")
    evaluate.add_argument("--eval-size", type=int, default=500)
    evaluate.set_defaults(func=_cmd_model_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rl.errors import CotuneRLError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CotuneRLError, ValueError, FileNotFoundError) as exc:
        print(f"cotune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
