"""The `cotune` CLI: model build/eval subcommands, one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments.cli import main


def test_model_build_reuses_the_cached_model(tiny_model_dir, capsys):
    assert main(["model", "build", "tiny", "--no-eval"]) == 0
    assert f"tiny model ready at {tiny_model_dir}" in capsys.readouterr().out


def test_missing_model_is_a_one_line_error_with_exit_code_2(tmp_path, capsys):
    assert main(["model", "eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cotune: error:") and "nowhere" in err and "\n" not in err


def test_unknown_subcommand_exits_non_zero():
    with pytest.raises(SystemExit) as exc:
        main(["model", "build", "huge"])
    assert exc.value.code != 0


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "model", "build", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "embedded" in out.stdout
