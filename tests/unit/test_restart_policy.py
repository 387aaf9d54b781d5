"""The restart policy is a graph setting with documented defaults, carried by the plan into the
supervisor (launch.local.restart_max_crashes / restart_window_s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tdist.errors import SpecErrors
from tdist.launch.rundir import LaunchOptions, RunRecord, write_plan
from tdist.launch.supervisor import make_supervisor
from tdist.plan import build_plan
from tdist.spec import load_graph
from tdist.spec.models import LocalLaunchSpec

ROOT = Path(__file__).resolve().parents[2]


def _graph(tmp_path: Path, local: dict) -> Path:
    data = yaml.safe_load((ROOT / "graphs" / "hello_world_python.yaml").read_text())
    data["python_path"] = [str((ROOT / "graphs" / p).resolve()) for p in data["python_path"]]
    data["launch"]["local"].update(local)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_documented_with_units() -> None:
    fields = LocalLaunchSpec.model_fields
    assert (fields["restart_max_crashes"].default, fields["restart_window_s"].default) == (5, 300.0)
    assert "restart_window_s" in (fields["restart_max_crashes"].description or "")
    assert "Seconds" in (fields["restart_window_s"].description or "")
    assert "restart_max_crashes" in (ROOT / "docs" / "spec.md").read_text()


def test_the_plan_carries_the_graph_settings_to_the_supervisor(tmp_path: Path) -> None:
    plan = build_plan(load_graph(_graph(tmp_path, {"restart_max_crashes": 3, "restart_window_s": 42.5})),
                      launcher="local", run_dir=str(tmp_path / "run"))
    assert (plan.restart_max_crashes, plan.restart_window_s) == (3, 42.5)
    (tmp_path / "run" / "logs").mkdir(parents=True)
    write_plan(plan)
    sup = make_supervisor(RunRecord.for_plan(plan, LaunchOptions.for_plan(plan)))
    assert (sup.restart_max_crashes, sup.restart_window_s) == (3, 42.5)


@pytest.mark.parametrize("bad", [{"restart_max_crashes": 0}, {"restart_window_s": 0}, {"restart_window_s": -1}])
def test_nonsense_is_refused(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(SpecErrors, match=str(next(iter(bad)))):
        load_graph(_graph(tmp_path, bad))
