"""The plan's CPU placement of LLM engines (cluster.cpus_per_node on a CPU-only cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tdist.spec.placement import cpu_assignment

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("roles", "cores", "want"), [
    # enough cores: disjoint equal ranges, context engines at the top, spare cores left to services
    (["context", "generation", "generation"], 8, [(6, 7), (0, 1), (2, 3)]),
    (["both", "both"], 4, [(0, 1), (2, 3)]),
    (["both", "both", "both"], 3, [(0,), (1,), (2,)]),
    # fewer cores than engines: a context engine keeps a core of its own, the rest share the others
    (["context", "generation", "generation"], 2, [(1,), (0,), (0,)]),
    (["context", "generation", "generation", "generation"], 3, [(2,), (0,), (1,), (0,)]),
    # as many context engines as cores: nothing to keep apart, round robin
    (["context", "context", "generation"], 2, [(1,), (0,), (0,)]),
    (["both", "both", "both"], 2, [(0,), (1,), (0,)]),
    ([], 4, []),
])
def test_cpu_assignment(roles: list[str], cores: int, want: list[tuple[int, ...]]) -> None:
    assert cpu_assignment(roles, cores) == want


def test_a_generation_engine_never_shares_a_core_with_a_context_engine_when_it_can_be_avoided() -> None:
    for cores in range(2, 17):
        for n_ctx in range(1, cores):
            for n_gen in range(1, 9):
                roles = ["context"] * n_ctx + ["generation"] * n_gen
                got = cpu_assignment(roles, cores)
                ctx = {c for ids in got[:n_ctx] for c in ids}
                gen = {c for ids in got[n_ctx:] for c in ids}
                assert not ctx & gen, (cores, n_ctx, n_gen, got)
                assert all(ids and max(ids) < cores for ids in got)
                # context engines never share among themselves either
                assert len(ctx) == sum(len(ids) for ids in got[:n_ctx])


def _plan(graph: dict, tmp_path: Path):  # noqa: ANN202
    from tdist.plan import build_plan
    from tdist.spec import load_graph

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(graph))
    return build_plan(load_graph(path), run_dir=str(tmp_path / "run"))


def test_the_cpu_disagg_graph_plans_context_apart_from_generation(tmp_path: Path) -> None:
    g = yaml.safe_load((REPO / "graphs" / "llm_disagg_cpu.yaml").read_text())
    g["llm"]["model"] = str(REPO / "models" / "tiny-llama")
    plan = _plan(g, tmp_path)
    cpus = {w.name: w.cpu_ids for w in plan.workers}
    assert cpus == {"context.0": [1], "generation.0": [0], "generation.1": [0], "frontend.0": [], "router.0": []}
    # without cpus_per_node the plan binds nothing (vLLM's own binding / parameters.cpu_bind)
    del g["cluster"]["cpus_per_node"]
    assert all(not w.cpu_ids for w in _plan(g, tmp_path).workers)
    # on GPUs the GPU placement decides; cpus_per_node binds no CPU
    g["cluster"].update(gpus_per_node=4, cpus_per_node=16)
    assert all(not w.cpu_ids for w in _plan(g, tmp_path).workers)
