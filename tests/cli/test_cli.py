"""The command line: help, version, info, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

import memaudit
from memaudit.cli import app

runner = CliRunner()


def test_version_and_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"memaudit {memaudit.__version__}"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output and "info" in res.output


def test_info_on_a_tiny_pipeline(tiny_dir_v):
    res = runner.invoke(app, ["info", str(tiny_dir_v)])
    assert res.exit_code == 0, res.output
    assert "v_prediction" in res.output and "DPMSolverMultistepScheduler" in res.output


def _run(*args):
    return subprocess.run([sys.executable, "-m", "memaudit", *args], capture_output=True, text=True, timeout=300)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, run_cli):
    # the one subprocess smoke test: the real entry point, `python -m memaudit`
    res = _run("info", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("Error:") and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    res = run_cli("info", str(tmp_path / "empty"))
    assert res.returncode == 2 and "model_index.json" in res.stderr and "Traceback" not in res.stderr


def test_bad_options_and_inputs_exit_2_without_partial_results(tmp_path, tiny_dir_eps, run_cli):
    out = tmp_path / "o"
    res = run_cli("audit", str(tiny_dir_eps), "--train", str(tmp_path / "nodata"), "--out", str(out))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("demo", "--no-such-option")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = run_cli("demo", "--model", "nope", "--out", str(out))
    assert res.returncode == 2 and "full_ft or base" in res.stderr
    res = run_cli("demo", "--setting", "nope", "--out", str(out))
    assert res.returncode == 2 and "faces, fashion" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    res = run_cli("demo", "--out", str(tmp_path / "file"))
    assert res.returncode == 2 and "is a file" in res.stderr
    assert not out.exists()


def test_demo_lists_its_settings_one_per_line(run_cli):
    from memaudit.demo.settings import setting_names

    res = run_cli("demo", "--list-settings")
    assert res.returncode == 0
    lines = res.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == setting_names() == ["faces", "fashion"]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)
    assert "fashion" in run_cli("demo", "--help").stdout
