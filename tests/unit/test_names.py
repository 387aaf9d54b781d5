"""Names are names: `--name` and every graph, worker and operator name pass one rule, and a run
directory is always a direct child of `$TDIST_HOME/runs/` that a re-deploy moves aside, never deletes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tdist.errors import InvalidName, LaunchError, SpecErrors
from tdist.launch.rundir import KEEP_PREVIOUS_RUNS, ProcessRecord, RunRecord, prepare_run_dir, run_dir_for
from tdist.names import NAME_MAX_LEN, is_valid_name, suggest_name
from tdist.spec import load_graph

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ["../../victim", "..", ".", "/etc", "a/b", "a\\b", "a.b", "a b", "", "1abc", "-x", "_x",
           "ok\n", "ok\r", "ok\x00", "\u00e9t\u00e9", "x" * (NAME_MAX_LEN + 1), "a*", "a>b"]


@pytest.mark.parametrize("name", ["hello-world", "hello_world", "A", "x" * NAME_MAX_LEN, "llm_disagg-2"])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(InvalidName) as info:
        run_dir_for(name)
    assert info.value.exit_code == 2
    assert is_valid_name(suggest_name(name))


def test_suggestion_keeps_the_meaningful_part() -> None:
    assert suggest_name("../../victim") == "victim"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TDIST_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_run_dir_is_a_direct_child_of_runs(home: Path) -> None:
    assert run_dir_for("hw").parent == home / "runs"


def _fake_run(path: Path, marker: str) -> None:
    (path / "logs").mkdir(parents=True, exist_ok=True)
    (path / "logs" / "w.log").write_text(marker)
    RunRecord(deployment=path.name, run_dir=str(path), plan_path=str(path / "plan.json"), state="stopped").save()


def test_redeploy_moves_the_previous_run_aside_and_keeps_a_bounded_number(home: Path) -> None:
    first, moved = prepare_run_dir("hw")
    assert moved is None and first.is_dir() and not any(p for p in first.iterdir() if p.name != "logs")
    markers = []
    for i in range(KEEP_PREVIOUS_RUNS + 2):
        marker = f"run {i}"
        markers.append(marker)
        _fake_run(first, marker)
        again, moved = prepare_run_dir("hw")
        assert again == first and moved is not None
        assert (moved / "logs" / "w.log").read_text() == marker  # logs of the previous run kept
        assert moved.parent == home / "runs" / ".previous" / "hw"
        assert list((again / "logs").iterdir()) == []
    kept = sorted((home / "runs" / ".previous" / "hw").iterdir())
    assert len(kept) == KEEP_PREVIOUS_RUNS
    assert [(k / "logs" / "w.log").read_text() for k in kept] == markers[-KEEP_PREVIOUS_RUNS:]


def test_redeploy_never_follows_a_symlinked_run_dir(home: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (home / "runs").mkdir(parents=True)
    os.symlink(victim, home / "runs" / "hw")
    with pytest.raises(LaunchError):
        prepare_run_dir("hw")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_live_run_is_not_moved(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = prepare_run_dir("hw")
    RunRecord(deployment="hw", run_dir=str(run_dir), plan_path=str(run_dir / "plan.json"), state="ready",
              supervisor=ProcessRecord.of(os.getpid())).save()
    with pytest.raises(LaunchError, match="already running"):
        prepare_run_dir("hw")
    assert (run_dir / "state.json").exists()


def _run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from tdist.cli.app import main

    monkeypatch.setattr(sys, "argv", ["tdist", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out + err


@pytest.mark.parametrize("command", [
    ["deploy", str(ROOT / "graphs" / "hello_world_python.yaml"), "--detach", "--name", "../../victim"],
    ["deploy", str(ROOT / "graphs" / "hello_world_python.yaml"), "--launcher", "mpirun", "--name", "../../victim"],
    ["status", "--name", "../../victim"],
    ["stop", "--name", "../../victim"],
    ["infer", "-c", "x", "--name", "../../victim"],
])
def test_cli_name_that_is_a_path_exits_2_and_touches_nothing(
    command: list[str], home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `$TDIST_HOME/runs/../../victim` is tmp_path/victim: the directory the old code emptied
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (victim / "state.json").write_text('{"deployment": "victim", "run_dir": "%s", "supervisor_pid": %d}' % (victim, os.getpid()))
    code, text = _run_cli(monkeypatch, capsys, *command)
    assert code == 2, text
    assert "--name" in text and "fix:" in text and "--name victim" in text
    assert "Traceback" not in text
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt", "state.json"]
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (home / "runs").exists() or list((home / "runs").iterdir()) == []


@pytest.mark.parametrize("where", ["name", "workers[0].name", "operators[0].name"])
def test_graph_names_with_a_trailing_newline_are_refused(where: str, tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load((ROOT / "graphs" / "hello_world_python.yaml").read_text())
    if where == "name":
        data["name"] = "hello\n"
    elif where.startswith("workers"):
        data["workers"][0]["name"] = data["workers"][0]["name"] + "\n"
    else:
        data["operators"][0]["name"] = data["operators"][0]["name"] + "\n"
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecErrors):
        load_graph(path)

