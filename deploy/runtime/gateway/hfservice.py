"""Chat and completions for the ``hf`` kind, on FastChat workers through :class:`Forwarder`.

Per request: one ``/count_token`` (the prompt must fit the context; FastChat's worker would
otherwise cut its start silently) and one ``/worker_generate_stream`` per choice, each on the
least busy replica; both retried on another replica when the first fails before answering.
``n`` choices run concurrently; in a stream they follow one another, as in FastChat.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from deploy.runtime.gateway import hf
from deploy.runtime.gateway.errors import ApiError, BadRequest, Unsupported, error_event
from deploy.runtime.gateway.forward import Forwarder, Retry, WorkerLost, holding
from deploy.runtime.gateway.routing import Replica

__all__ = ["HfService"]

Send = Any
RETRIES_AFTER_LOSS = 2


class HfService:
    """The ``hf`` kind's routes."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.fw = forwarder

    def _template(self, model: str) -> Mapping[str, Any]:
        for replica in self.fw.table.models().get(model, []):
            if replica.conv is not None:
                return replica.conv
        raise self._no_replica(model)

    def _no_replica(self, model: str) -> ApiError:
        from deploy.runtime.gateway.errors import NoReplica

        return NoReplica(f"no replica of {model!r} is up at the moment; retry shortly")

    async def count(self, model: str, prompt: str, affinity: str | None) -> int:
        """Tokens in ``prompt`` as the worker counts them."""
        for replica in self.fw.attempts(model, affinity):
            try:
                data = await self.fw.post_json(replica, "/count_token", {"model": model, "prompt": prompt})
            except Retry:
                continue
            count = data.get("count")
            if not isinstance(count, int):
                raise BadRequest(str(data.get("text", "the worker could not count the prompt"))[:300])
            return count
        raise AssertionError("unreachable")  # attempts() raises when none is left

    async def generate(
        self, model: str, params: dict[str, Any], affinity: str | None
    ) -> AsyncIterator[tuple[Replica, dict[str, Any]]]:
        """The worker's objects for ``params``, from the first replica that starts answering."""
        for replica in self.fw.attempts(model, affinity):
            with holding(replica):
                stream = self.fw.worker_stream(replica, params)
                try:
                    try:
                        first = await stream.__anext__()
                    except Retry:
                        continue
                    except StopAsyncIteration:
                        return
                    yield replica, first
                    async for item in stream:
                        yield replica, item
                    return
                finally:
                    await stream.aclose()  # closes the connection: the worker stops generating

    async def _choice(
        self, index: int, model: str, params: dict[str, Any], affinity: str | None
    ) -> hf.Choice:
        # Nothing of a non-streamed answer has reached the client: a worker lost midway is
        # retried from the start on another replica (the lost one is out of rotation).
        for attempt in range(RETRIES_AFTER_LOSS + 1):
            choice = hf.Choice(index)
            try:
                async for _replica, item in self.generate(model, params, affinity):
                    choice.advance(item)
            except WorkerLost:
                if attempt == RETRIES_AFTER_LOSS:
                    raise
                continue
            break
        choice.fix_usage(params["max_new_tokens"])
        return choice

    # ----- chat -----

    async def chat(self, send: Send, body: dict[str, Any], model: str, affinity: str | None) -> None:
        """``/v1/chat/completions``."""
        hf.check_fields(body, hf.CHAT_FIELDS)
        prompt, stop_ids, stops = hf.chat_prompt(body.get("messages"), self._template(model))
        params = await self._params(body, model, prompt, stop_ids, stops, affinity)
        n = int(body.get("n") or 1)
        if body.get("logprobs"):
            params["logprobs"] = 1
        if body.get("stream"):
            await _sse(send, self._chat_stream(body, model, params, n, affinity))
            return
        choices = await asyncio.gather(*(self._choice(i, model, params, affinity) for i in range(n)))
        answer = {
            "id": hf.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": hf.now(),
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": hf.chat_logprobs(c.logprobs) if body.get("logprobs") else None,
                    "finish_reason": c.finish_reason or "stop",
                }
                for c in choices
            ],
            "usage": _usage(choices),
        }
        await _json(send, answer)

    async def _chat_stream(
        self, body: dict[str, Any], model: str, params: dict[str, Any], n: int, affinity: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        head = {
            "id": hf.new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": hf.now(),
            "model": model,
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        done: list[hf.Choice] = []
        for i in range(n):
            choice = hf.Choice(i)
            first = True
            async for _replica, item in self.generate(model, params, affinity):
                seen = len((choice.logprobs or {}).get("tokens") or [])
                delta_text = choice.advance(item)
                delta: dict[str, Any] = {"content": delta_text}
                if first:
                    delta = {"role": "assistant", "content": delta_text}
                    first = False
                elif not delta_text and not choice.finish_reason:
                    continue
                logprobs = hf.chat_logprobs(choice.logprobs, seen) if body.get("logprobs") else None
                yield {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": delta,
                            "logprobs": logprobs,
                            "finish_reason": choice.finish_reason,
                        }
                    ],
                    **extra,
                }
            choice.fix_usage(params["max_new_tokens"])
            if first:  # the worker sent nothing at all
                yield {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    **extra,
                }
            done.append(choice)
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(done)}

    # ----- completions -----

    async def completions(self, send: Send, body: dict[str, Any], model: str, affinity: str | None) -> None:
        """``/v1/completions``."""
        hf.check_fields(body, hf.COMPLETION_FIELDS)
        prompts = body.get("prompt")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise BadRequest("'prompt' must be a string or a non-empty list of strings", param="prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise Unsupported("prompt", "hf", what="prompts given as token ids")
        n = int(body.get("n") or 1)
        logprobs = body.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
            raise BadRequest("'logprobs' must be a whole number for completions", param="logprobs")
        if logprobs and logprobs > 1:
            raise Unsupported("logprobs", "hf", what="alternatives per token ('logprobs' > 1)")
        echo = bool(body.get("echo"))
        counts = await asyncio.gather(*(self.count(model, p, affinity) for p in prompts))
        all_params = []
        for prompt, count in zip(prompts, counts, strict=True):
            new = hf.max_new_tokens(body, count, self.fw.table.context_length(model) or 0)
            params = hf.gen_params(
                body, model=model, prompt=prompt, new_tokens=new, echo=echo, logprobs=logprobs
            )
            all_params.append(params)
        if body.get("stream"):
            await _sse(send, self._completion_stream(body, model, all_params, n, affinity))
            return
        jobs = [
            self._choice(i * n + j, model, p, affinity) for i, p in enumerate(all_params) for j in range(n)
        ]
        choices = await asyncio.gather(*jobs)
        answer = {
            "id": hf.new_id("cmpl"),
            "object": "text_completion",
            "created": hf.now(),
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": c.logprobs if logprobs is not None else None,
                    "finish_reason": c.finish_reason or "stop",
                }
                for c in choices
            ],
            "usage": _usage(choices, per_prompt=n),
        }
        await _json(send, answer)

    async def _completion_stream(
        self, body: dict[str, Any], model: str, all_params: list[dict[str, Any]], n: int, affinity: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        head = {"id": hf.new_id("cmpl"), "object": "text_completion", "created": hf.now(), "model": model}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        done: list[hf.Choice] = []
        for i, params in enumerate(all_params):
            for j in range(n):
                choice = hf.Choice(i * n + j)
                async for _replica, item in self.generate(model, params, affinity):
                    delta = choice.advance(item)
                    if delta or choice.finish_reason:
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": choice.index,
                                    "text": delta,
                                    "logprobs": None,
                                    "finish_reason": choice.finish_reason,
                                }
                            ],
                            **extra,
                        }
                choice.fix_usage(params["max_new_tokens"])
                done.append(choice)
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(done, per_prompt=n)}

    async def _params(
        self,
        body: dict[str, Any],
        model: str,
        prompt: str,
        stop_ids: list[int],
        stops: list[str],
        affinity: str | None,
    ) -> dict[str, Any]:
        count = await self.count(model, prompt, affinity)
        new = hf.max_new_tokens(body, count, self.fw.table.context_length(model) or 0)
        return hf.gen_params(
            body, model=model, prompt=prompt, new_tokens=new, stop_token_ids=stop_ids, template_stops=stops
        )


def _usage(choices: list[hf.Choice], per_prompt: int | None = None) -> dict[str, int]:
    completion = sum(c.usage.get("completion_tokens", 0) for c in choices)
    if per_prompt:  # each prompt counted once, whatever n
        prompt = sum(c.usage.get("prompt_tokens", 0) for c in choices[::per_prompt])
    else:
        prompt = choices[0].usage.get("prompt_tokens", 0) if choices else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _json(send: Send, data: Any) -> None:
    from deploy.runtime.asgi import send_json

    await send_json(send, 200, data)


async def _sse(send: Send, events: AsyncIterator[dict[str, Any]]) -> None:
    """Stream ``events``; an error before the first event is raised, after it ends the stream."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = None
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    if first is not None:
        await send({"type": "http.response.body", "body": _event(first), "more_body": True})
        try:
            async for event in events:
                await send({"type": "http.response.body", "body": _event(event), "more_body": True})
        except ApiError as exc:
            await send({"type": "http.response.body", "body": error_event(exc), "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"
