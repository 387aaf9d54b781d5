"""How long planning takes at cluster scale: 1,000 nodes × 8 GPUs = 8,000 engine ranks.

    .venv/bin/python benchmarks/plan_scale.py [--nodes 1000] [--gpus-per-node 8] [--repeat 5]

Times each step (validate the graph text, build the plan, emit srun argv, emit the sbatch script,
serialise plan.json) and prints the best and median of `--repeat` runs. Pure CPU work: no
process is started, no socket opened. A benchmark, not a test: results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from tdist.plan import build_plan, emit_sbatch, emit_srun
from tdist.spec import parse_graph


def graph_text(nodes: int, gpus_per_node: int, tp: int) -> str:
    instances = nodes * gpus_per_node // tp
    return f"""\
name: scale
llm:
  model: /models/llama
  engine: vllm
  servers: {{num_instances: {instances}, tp_size: {tp}}}
operators:
  - {{name: frontend, kind: frontend, protocol: openai, port: 8000}}
  - {{name: router, kind: router}}
workers:
  - {{name: frontend, operators: [frontend]}}
  - {{name: router, operators: [router]}}
cluster: {{nodes: {nodes}, gpus_per_node: {gpus_per_node}}}
launch:
  srun: {{partition: batch, time_limit: "04:00:00", container_image: "nvcr.io#nvidia/vllm:latest"}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=8, help="tensor-parallel ranks per engine instance")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    text = graph_text(args.nodes, args.gpus_per_node, args.tp)
    steps: dict[str, list[float]] = {k: [] for k in ("validate", "build_plan", "emit_srun", "emit_sbatch", "plan.json", "total")}
    size = 0
    world = 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        spec = parse_graph(text, file="scale.yaml", base_dir="/repo/graphs")
        t1 = time.perf_counter()
        plan = build_plan(spec, launcher="srun", run_dir="/run")
        t2 = time.perf_counter()
        argv = emit_srun(plan, "/run/plan.json")
        t3 = time.perf_counter()
        script = emit_sbatch(plan, "/run/plan.json")
        t4 = time.perf_counter()
        doc = plan.model_dump_json()
        t5 = time.perf_counter()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
            steps[k].append(v)
        size, world = len(doc), plan.world_size
        assert argv[0] == "srun" and script.startswith("#!/bin/bash")
    print(f"plan_scale: {args.nodes} nodes x {args.gpus_per_node} GPUs, tp {args.tp} -> world {world} ranks "
          f"+ {len(plan.service_workers)} service workers; plan.json {size / 1e6:.1f} MB")
    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeat} runs")
    print(f"{'step':<12} {'best ms':>9} {'median ms':>10}")
    for k, v in steps.items():
        print(f"{k:<12} {min(v) * 1e3:>9.1f} {statistics.median(v) * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
