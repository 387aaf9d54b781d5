"""`tdist validate` / `tdist plan` through the real entry point, in-process (no subprocess, no socket)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tdist.cli.app import app, main
from tdist.errors import SpecErrors

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted(str(p) for p in (ROOT / "graphs").glob("*.yaml"))


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tdist", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _bad_graph(tmp_path: Path) -> Path:
    text = (ROOT / "graphs" / "hello_world.yaml").read_text().replace("    replicas: 1\n", "    replcas: 1\n", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_validate_misspelt_key_exits_2_without_traceback(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "validate", str(_bad_graph(tmp_path)))
    assert code == 2
    assert "workers[0].replcas" in err and "did you mean 'replicas'" in err
    assert "Traceback" not in err + out


def test_debug_shows_the_exception(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["tdist", "--debug", "validate", str(_bad_graph(tmp_path))])
    with pytest.raises(SpecErrors):
        main()


def test_validate_all_graphs(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "validate", *GRAPHS)
    assert code == 0, err
    assert out.count("ok ") == len(GRAPHS)


def test_validate_reports_every_bad_file(monkeypatch, capsys, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("name: x\nworkers: [{name: w, operators: [nope]}]\n")
    code, out, err = run_main(monkeypatch, capsys, "validate", GRAPHS[0], str(_bad_graph(tmp_path)), str(other))
    assert code == 2
    assert "ok " in out
    assert "bad.yaml" in err and "other.yaml" in err and "unknown operator" in err


def test_validate_missing_file(monkeypatch, capsys, tmp_path):
    code, _out, err = run_main(monkeypatch, capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "cannot read graph file" in err


def test_plan_srun_script_for_llm_disagg(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "plan", str(ROOT / "graphs" / "llm_disagg.yaml"),
                              "--launcher", "srun", "--format", "script", "--run-dir", "/run")
    assert code == 0, err
    assert out.startswith("#!/bin/bash\n")
    assert "#SBATCH --ntasks=3" in out and "srun --mpi=pmix" in out and "PLAN=/run/plan.json" in out


def test_plan_table_json_yaml(monkeypatch, capsys):
    graph = str(ROOT / "graphs" / "llm_disagg.yaml")
    code, out, _ = run_main(monkeypatch, capsys, "plan", graph)
    assert code == 0 and "context.0" in out and "generation.1" in out and "world 3" in out
    code, out, _ = run_main(monkeypatch, capsys, "plan", graph, "--format", "json", "--run-dir", "/run")
    data = json.loads(out)
    assert data["world_size"] == 3 and data["workers"][0]["name"] == "context.0"
    code, out, _ = run_main(monkeypatch, capsys, "plan", graph, "-f", "yaml", "-l", "mpirun")
    assert yaml.safe_load(out)["launcher"] == "mpirun"
    code, out, _ = run_main(monkeypatch, capsys, "plan", graph, "-f", "script", "-l", "mpirun")
    assert out.startswith("mpirun ") and "-np 3" in out
    code, out, _ = run_main(monkeypatch, capsys, "plan", graph, "-f", "script")
    assert "--rank 4" in out


def test_plan_rejects_an_unknown_launcher(monkeypatch, capsys):
    code, _out, err = run_main(monkeypatch, capsys, "plan", GRAPHS[0], "--launcher", "kubectl")
    assert code == 2 and "kubectl" in err


def test_help_reads_well():
    runner = CliRunner()
    for cmd in ("validate", "plan"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0
        assert "Usage" in result.output
    assert "--launcher" in runner.invoke(app, ["plan", "--help"]).output
