"""The gateway's pure parts: replica choice, hf-kind translation, limits, spec defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.runtime.gateway import hf
from deploy.runtime.gateway.errors import BadRequest, ModelNotFound, TooManyRequests, Unsupported
from deploy.runtime.gateway.limits import KeyGate, Limits, check_request
from deploy.runtime.gateway.routing import Replica, RoutingTable
from deploy.runtime.vllm_bridge.cli import conv_template
from deploy.spec.model import ApiLimitsSpec

CONV = conv_template("qwen-7b-chat")  # as /worker_get_conv_template sends it


def _table(*replicas: Replica) -> RoutingTable:
    table = RoutingTable()
    listed = {r.url: {"model_names": list(r.models), "queue_length": r.queue_length} for r in replicas}
    table.update(listed, replicas)
    return table


def _replica(url: str, **kw: Any) -> Replica:
    return Replica(url=url, models=("m",), kind=kw.pop("kind", "vllm"), context_length=2048, **kw)


def test_least_outstanding_then_queue_then_rotation() -> None:
    a, b, c = _replica("a"), _replica("b"), _replica("c", queue_length=3)
    table = _table(a, b, c)
    a.outstanding = 2
    assert table.pick("m") is b
    b.outstanding = 2
    c.outstanding = 2
    picks = {table.pick("m").url for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"a", "b"}  # c's queue is longer; a and b take turns


def test_affinity_is_sticky_and_moves_only_when_its_replica_goes() -> None:
    replicas = [_replica(u) for u in "abcd"]
    table = _table(*replicas)
    chosen = table.pick("m", affinity="s:agent-1")
    assert chosen is not None
    assert all(table.pick("m", affinity="s:agent-1") is chosen for _ in range(5))
    others = {k: table.pick("m", affinity=k) for k in (f"s:{i}" for i in range(40))}
    table.mark_down(chosen.url)
    moved = table.pick("m", affinity="s:agent-1")
    assert moved is not None and moved is not chosen
    # rendezvous hashing: sessions on other replicas stay where they were
    assert all(table.pick("m", affinity=k) is r for k, r in others.items() if r is not chosen)


def test_down_and_excluded_replicas_are_skipped_and_refresh_keeps_counts() -> None:
    a, b = _replica("a"), _replica("b")
    table = _table(a, b)
    table.mark_down("a")
    assert table.pick("m") is b and table.pick("m", exclude={"b"}) is None
    assert table.served() == ["m"] and table.known("m") and table.kind("m") == "vllm"
    b.outstanding = 3
    table.update({"b": {"model_names": ["m"], "queue_length": 1}}, [])
    assert list(table.replicas) == ["b"] and b.outstanding == 3 and b.queue_length == 1


def test_withdrawn_replica_serves_nothing() -> None:
    table = _table(_replica("a"))
    table.update({"a": {"model_names": [], "queue_length": 0}}, [])
    assert table.served() == [] and table.pick("m") is None


def test_chat_prompt_developer_is_system_and_parts_are_joined() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    prompt, stop_ids, stops = hf.chat_prompt(messages, CONV)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Hi\nthere" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert stop_ids == list(CONV["stop_token_ids"]) and stops == [CONV["stop_str"]]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role"),
        ([{"role": "assistant", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
    ],
)
def test_chat_prompt_refuses_what_hf_cannot_render(messages: list[Any], param: str) -> None:
    with pytest.raises(Unsupported) as caught:
        hf.chat_prompt(messages, CONV)
    assert caught.value.param == param and "'vllm'" in caught.value.message


def test_chat_prompt_bad_role_is_a_400_not_a_500() -> None:
    with pytest.raises(BadRequest) as caught:
        hf.chat_prompt([{"role": "wizard", "content": "x"}], CONV)
    assert caught.value.param == "messages[0].role" and caught.value.status == 400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_check_fields_names_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        hf.check_fields({"model": "m", "messages": [], **fields}, hf.CHAT_FIELDS)
    assert caught.value.param == param


def test_check_fields_accepts_the_harmless() -> None:
    hf.check_fields(
        {"model": "m", "messages": [], "tool_choice": "none", "response_format": {"type": "text"}, "seed": 1,
         "user": "u", "stream_options": {"include_usage": True}, "max_completion_tokens": 4},
        hf.CHAT_FIELDS,
    )  # fmt: skip


def test_max_new_tokens_prefers_max_completion_tokens_and_bounds_by_context() -> None:
    assert hf.max_new_tokens({"max_completion_tokens": 4, "max_tokens": 100}, 30, 2048) == 4
    assert hf.max_new_tokens({}, 30, 2048) == 2018
    with pytest.raises(BadRequest) as caught:
        hf.max_new_tokens({"max_tokens": 2019}, 30, 2048)
    assert caught.value.code == "context_length_exceeded"


def test_worker_usage_cut_at_the_limit_is_corrected() -> None:
    choice = hf.Choice(0)
    choice.advance(
        {"text": "abc", "finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    )
    choice.fix_usage(4)
    assert choice.usage["completion_tokens"] == 4 and choice.usage["total_tokens"] == 9
    assert choice.advance({"text": "abcde"}) == "de"


def test_limits_n_prompts_and_key_gate() -> None:
    limits = Limits(max_n=2, max_prompts=2)
    check_request({"n": 2, "prompt": ["a", "b"]}, limits)
    for body, param in (({"n": 3}, "n"), ({"n": 0}, "n"), ({"prompt": ["a"] * 3}, "prompt"),
                        ({"max_tokens": -1}, "max_tokens")):  # fmt: skip
        with pytest.raises(BadRequest) as caught:
            check_request(body, limits)
        assert caught.value.param == param
    gate = KeyGate(1)
    with gate.hold("k"), pytest.raises(TooManyRequests), gate.hold("k"):
        pass
    with gate.hold("k"):
        assert gate.open == {"k": 1}
    assert gate.open == {}


def test_errors_are_openai_shaped() -> None:
    body = ModelNotFound("x", ["b", "a"]).body()
    assert body == {
        "error": {
            "message": "The model 'x' does not exist; served models: a, b",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_spec_limit_defaults_are_the_gateways() -> None:
    """The renderer passes only limits that differ from ApiLimitsSpec's, so the two must agree."""
    spec, runtime = ApiLimitsSpec(), Limits()
    assert (spec.max_body_bytes, spec.max_n, spec.max_prompts, spec.per_key_concurrency) == (
        runtime.max_body_bytes, runtime.max_n, runtime.max_prompts, runtime.per_key_concurrency,
    )  # fmt: skip


def test_metrics_render_prometheus_text() -> None:
    from deploy.runtime.gateway.metrics import Metrics

    metrics = Metrics()
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    r = "http://10.0.0.11:31020"
    metrics.record(
        model="m", kind="vllm", replica=r, key="key-1", status=200, seconds=0.03, first_byte=0.01, usage=usage
    )
    text = metrics.render()
    labels = f'model="m",kind="vllm",replica="{r}",key="key-1"'
    assert f'llm_gateway_requests_total{{{labels},status="200"}} 1' in text
    assert f'llm_gateway_tokens_total{{{labels},type="prompt"}} 5' in text
    assert f'llm_gateway_request_seconds_bucket{{{labels},le="0.05"}} 1' in text
    assert f'llm_gateway_request_seconds_bucket{{{labels},le="0.025"}} 0' in text
    assert f"llm_gateway_first_byte_seconds_count{{{labels}}} 1" in text


def test_status_and_usage_read_what_the_gateway_renders() -> None:
    """The gateway's /metrics text, parsed by ``status`` (recent rates) and ``usage`` (per key)."""
    from deploy.health.traffic import KeyUsage, key_usage, model_traffic
    from deploy.runtime.gateway.metrics import Metrics

    metrics = Metrics(started=0.0)  # up for long: the rates are over the whole window
    for key, replica, status, usage in [
        ("alice", "http://a:1", 200, {"prompt_tokens": 30, "completion_tokens": 6}),
        ("alice", "http://b:1", 200, {"prompt_tokens": 30, "completion_tokens": 6}),  # summed over replicas
        ('bob "the agent"', "http://a:1", 200, {"prompt_tokens": 5, "completion_tokens": 1}),
        (r"c:\agents\n", "-", 429, None),  # backslashes and quotes survive the label escaping
    ]:
        metrics.record(
            model="m", kind="vllm", replica=replica, key=key, status=status, seconds=0.1, first_byte=0.05,
            usage=usage,
        )  # fmt: skip
    text = metrics.render()
    traffic = model_traffic(text)
    assert traffic["m"]["requests_per_s"] == pytest.approx(4 / 60, rel=1e-5)
    assert traffic["m"]["prompt_tokens_per_s"] == pytest.approx(65 / 60, rel=1e-5)
    assert traffic["m"]["completion_tokens_per_s"] == pytest.approx(13 / 60, rel=1e-5)
    assert key_usage(text) == [
        KeyUsage("alice", requests=2, errors=0, prompt_tokens=60, completion_tokens=12),
        KeyUsage('bob "the agent"', requests=1, errors=0, prompt_tokens=5, completion_tokens=1),
        KeyUsage(r"c:\agents\n", requests=1, errors=1, prompt_tokens=0, completion_tokens=0),
    ]


def test_gateway_key_names_come_from_the_key_file(tmp_path: Any) -> None:
    from deploy.runtime.security import load_named_api_keys
    from deploy.security.keystore import KeyStore

    store = KeyStore((("default", "k-one"), ("ci-agent", "k-two")))
    path = tmp_path / "keys"
    path.write_text(store.render("c") + "k-three\n")
    path.chmod(0o600)
    named = load_named_api_keys(path)
    assert named == (("default", "k-one"), ("ci-agent", "k-two"), ("key-3", "k-three"))
    assert KeyStore.parse(path.read_text()).entries[:2] == named[:2]


def test_refresh_soon_waits_for_a_refresh_that_sees_a_just_registered_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CI failure of stop 20: a refresh ran just before the workers re-registered, and a
    request's on-demand refresh was skipped as "too soon", so it got 503 with workers up.

    The controller and worker answers are an in-process ``httpx.MockTransport`` (the registry's
    own logic is under test; the integration tier runs it against the real controller)."""
    import asyncio

    import httpx

    from deploy.runtime.gateway import registry as registry_module

    monkeypatch.setattr(registry_module, "MIN_ON_DEMAND", 0.3)
    workers: dict[str, Any] = {}
    lists = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal lists
        route = request.url.path
        if route == "/list_workers":
            lists += 1
            return httpx.Response(200, json={"workers": workers})
        if route == "/worker_get_status":
            return httpx.Response(200, json={"model_names": ["tiny"], "kind": "vllm"})
        if route == "/model_details":
            return httpx.Response(200, json={"context_length": 2048})
        return httpx.Response(404)

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            table = RoutingTable()
            reg = registry_module.Registry("http://controller", table, client, interval=60)
            await reg.refresh()  # the loop's refresh: nothing registered yet
            assert table.served() == [] and lists == 1
            workers["http://w1"] = {"model_names": ["tiny"], "queue_length": 0}
            loop = asyncio.get_running_loop()
            began = loop.time()
            await asyncio.gather(*(reg.refresh_soon() for _ in range(5)))
            assert table.served() == ["tiny"]  # the request sees the worker
            assert lists == 2  # five askers, one refresh
            assert loop.time() - began >= 0.25  # it waited out the rate limit rather than skip
            await reg.refresh_soon()  # asked after that refresh: a new one, a limit later
            assert lists == 3

    asyncio.run(scenario())


def test_the_direct_path_to_vllm_is_only_for_a_bridge_on_this_host() -> None:
    from deploy.runtime.gateway.registry import _direct_engine, on_this_host

    engine = {"engine": {"url": "http://127.0.0.1:32020", "model": "tiny"}}
    assert on_this_host("http://127.0.0.1:31020") and on_this_host("http://[::1]:31020")
    assert not on_this_host("http://203.0.113.7:31020")  # TEST-NET-3: never this host's
    assert not on_this_host("http://gpu1:31020")  # a name is not resolved here
    assert _direct_engine("http://127.0.0.1:31020", engine) == ("http://127.0.0.1:32020", "tiny")
    # Another host's vLLM listens on that host's loopback: only its bridge reaches it.
    assert _direct_engine("http://203.0.113.7:31020", engine) == (None, None)
    assert _direct_engine("http://127.0.0.1:31020", {}) == (None, None)  # keyed, or not ready
    elsewhere = {"engine": {"url": "http://10.0.0.5:32020", "model": "tiny"}}
    assert _direct_engine("http://127.0.0.1:31020", elsewhere) == (None, None)


def test_the_direct_path_sets_the_served_model_name() -> None:
    from deploy.runtime.gateway.forward import _with_model

    raw = b'{"model": "tiny", "messages": []}'
    assert _with_model(raw, "tiny") is raw
    assert json.loads(_with_model(raw, "served")) == {"model": "served", "messages": []}
    assert _with_model(b"{not json", "served") == b"{not json"  # vLLM says what is wrong with it
    assert Replica("http://b", ("tiny",), "vllm", 2048, engine="http://127.0.0.1:1").openai_url == (
        "http://127.0.0.1:1"
    )
    assert Replica("http://b", ("tiny",), "vllm", 2048).openai_url == "http://b"
