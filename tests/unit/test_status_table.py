"""`tdist status`'s table: readable in an 80-column terminal (no column that carries nothing)."""

from __future__ import annotations

from rich.console import Console

from tdist.cli.deploy_view import status_table


def _worker(name: str, **kw: object) -> dict:
    base = {"name": name, "state": "ready", "host": "node-a", "pid": 41234, "rank": None, "inflight": 16, "served": 1501,
            "errors": 0, "uptime_s": 12.0, "heartbeat_age_s": 0.4, "restarts": 0, "operators": {}}
    return {**base, **kw}


def _render(table, width: int = 80) -> str:  # noqa: ANN001
    console = Console(width=width, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def test_hello_world_fits_80_columns_without_truncation() -> None:
    comps = {c: {"operators": [c], "workers": [_worker(f"{c}.0", rank=i)]}
             for i, c in enumerate(("encoder", "decoder", "encoder_decoder", "kserve"))}
    text = _render(status_table("hello-world", "ready", "nats://127.0.0.1:4222", comps))
    assert "…" not in text, text
    assert "host node-a" in text  # one host: in the title, not a column
    for word in ("encoder_decoder.0", "ready", "41234", "1501", "rank", "in-flight", "heartbeat"):
        assert word in text, (word, text)
    assert "component" not in text and "restarts" not in text and "llm" not in text


def test_columns_appear_when_they_carry_something() -> None:
    llm_stats = {"generation": {"stats": {"engine": "vllm", "role": "generation", "kv_cache_usage": 0.25,
                                          "prefix_cache_hit_rate": 0.5}}}
    comps = {"generation": {"operators": ["generation"], "workers": [
        _worker("generation.0", host="node-a", restarts=2, operators=llm_stats),
        _worker("generation.1", host="node-b", operators=llm_stats)]},
        "router": {"operators": ["router"], "workers": []}}
    text = _render(status_table("llm", "ready", "nats://h:4222", comps), width=200)
    for word in ("component", "host", "node-b", "restarts", "generation · kv 25% · prefix hit 50%", "no worker"):
        assert word in text, (word, text)
