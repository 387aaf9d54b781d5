"""Pure pieces shared by the LLM operators: sampling, prompts, chat rendering, engine args."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tdist.errors import BadRequest, OperatorLoadError
from tdist.operators.llm.convention import parse_prompt, parse_sampling, render_chat, render_chat_fallback
from tdist.operators.llm.llm_common import Chunk, chunk_to_response, load_engine_args


def load_tiny_model_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampling_defaults_and_coercion() -> None:
    s = parse_sampling({})
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (16, 1.0, 1.0, 0, None, ())
    s = parse_sampling({"max_tokens": "10", "temperature": 0, "top_p": 0.5, "seed": 7.0, "stop": "\n",
                        "ignore_eos": True, "top_k": -1, "temperature_unused": 1})
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.ignore_eos, s.top_k) == (10, 0.0, 0.5, 7, ("\n",), True, 0)
    assert s.greedy
    assert parse_sampling({"max_tokens": None}, default_max_tokens=5).max_tokens == 5
    assert parse_sampling({"max_tokens": np.int64(3)}).max_tokens == 3


@pytest.mark.parametrize(
    "params,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_sampling_is_bad_request(params: dict, param: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_sampling(params)
    assert param in str(e.value)


def test_prompt_forms() -> None:
    assert parse_prompt({"prompt": "hi"}).text == "hi"
    assert parse_prompt({"prompt": ["hi"]}).text == "hi"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    p = parse_prompt({"messages": msgs})
    assert p.messages == ({"role": "user", "content": "ab"},)
    assert p.routing_key() == "user: ab"
    ids = parse_prompt({}, {"prompt_token_ids": np.array([[1, 2, 3]])})
    assert ids.token_ids == (1, 2, 3)
    for bad in ({}, {"prompt": 3}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                {"messages": []}, {"messages": [{"content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        with pytest.raises(BadRequest):
            parse_prompt(bad)
    with pytest.raises(BadRequest):
        parse_prompt({}, {"prompt_token_ids": np.array([1.5])})


def test_chat_rendering() -> None:
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_chat_fallback(msgs) == "system: s\nuser: u\nassistant:"
    assert render_chat(None, msgs) == render_chat_fallback(msgs)

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "|".join(m["content"] for m in messages) + "|>"

    assert render_chat(Tok(), msgs) == "s|u|>"


def test_tiny_model_chat_template(tmp_path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    tok = load_tiny_model_script().build_tokenizer(300)
    text = render_chat(tok, [{"role": "user", "content": "Describe the capital of France"}])
    assert text == "<|im_start|>user\nDescribe the capital of France<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False).endswith("assistant\n")


def test_chunk_to_response_follows_the_convention() -> None:
    outputs, params = chunk_to_response(Chunk(text="a", token_ids=[5]))
    assert outputs["token_ids"].dtype == np.int64 and list(outputs["token_ids"]) == [5]
    assert params == {"text": "a"}
    _, params = chunk_to_response(Chunk(text="", token_ids=[], finished=True, finish_reason="length",
                                        prompt_tokens=3, completion_tokens=4, cached_tokens=0))
    assert params["finish_reason"] == "length"
    assert params["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "cached_tokens": 0}


def test_engine_args_from_file_and_inline(tmp_path) -> None:
    f = tmp_path / "e.yaml"
    f.write_text("model: /m\ndtype: float32\nmax_model_len: 512\n")
    assert load_engine_args({"config": str(f), "max_model_len": 1024}) == {"model": "/m", "dtype": "float32", "max_model_len": 1024}
    j = tmp_path / "e.json"
    j.write_text(json.dumps({"model": "/j"}))
    assert load_engine_args({}, {"engine_config": str(j)}) == {"model": "/j"}
    with pytest.raises(OperatorLoadError, match="not found"):
        load_engine_args({"config": str(tmp_path / "missing.json")})
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(OperatorLoadError, match="mapping"):
        load_engine_args({"config": str(tmp_path / "bad.json")})


def test_engine_processes_are_reniced(tmp_path) -> None:
    import os
    import subprocess
    import sys
    import time

    from tdist.operators.llm.engine_processes import renice_children

    if not sys.platform.startswith("linux"):
        pytest.skip("linux /proc only")
    # a child that itself has a child, like the tdist worker → EngineCore → VLLM::Worker
    before = os.getpriority(os.PRIO_PROCESS, os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import subprocess,sys; subprocess.run(['sleep','20'])"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = renice_children(7, root=child.pid)  # never this process's other children
            if pids:
                break
            time.sleep(0.05)
        assert len(pids) == 1  # the grandchild
        assert all(os.getpriority(os.PRIO_PROCESS, p) == 7 for p in pids)
        assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == before  # this process is untouched
    finally:
        child.kill()
        child.wait()


def test_cpu_bind_choice() -> None:
    import os

    from tdist.operators.llm.engine_processes import cpu_bind_of

    assert cpu_bind_of(None, [], 0) is None and cpu_bind_of("auto", [], 3) is None
    aff = sorted(os.sched_getaffinity(0))
    assert cpu_bind_of(None, aff, 0) == ",".join(map(str, aff))
    assert cpu_bind_of(None, [aff[0], max(aff) + 1], 0) == str(aff[0])  # a core this machine lacks is dropped
    assert cpu_bind_of(None, [max(aff) + 1], 0) is None  # none left: vLLM's own binding
    assert cpu_bind_of("0-3", [5], 1) == "0-3"
    assert cpu_bind_of("replica", [], 5) == str(5 % (os.cpu_count() or 1))


def test_cpu_list_and_pinning() -> None:
    import os
    import subprocess
    import sys
    import time

    from tdist.operators.llm.engine_processes import parse_cpu_list, pin_children

    assert parse_cpu_list("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpu_list("1|2") == {1, 2} and parse_cpu_list("5") == {5}
    if not sys.platform.startswith("linux"):
        pytest.skip("linux only")
    child = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep','20'])"])
    try:
        one = {min(os.sched_getaffinity(0))}
        deadline = time.monotonic() + 10
        pids: list[int] = []
        while not pids and time.monotonic() < deadline:
            pids = pin_children(one, root=child.pid)
            time.sleep(0.05)
        assert pids and all(os.sched_getaffinity(p) == one for p in pids)
    finally:
        child.kill()
        child.wait()


def test_a_missing_model_directory_says_so_not_hugging_face_repo_syntax(tmp_path) -> None:
    from tdist.errors import OperatorLoadError
    from tdist.operators.llm.vllm import build_engine_args

    for model in (str(tmp_path / "nope"), "./models/nope", "../nope"):
        with pytest.raises(OperatorLoadError, match="no such directory") as info:
            build_engine_args({"model": model})
        assert "make_tiny_model.py" in str(info.value)
    with pytest.raises(OperatorLoadError, match="need 'model'"):
        build_engine_args({})
