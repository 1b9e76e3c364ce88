"""Calling :mod:`deploy.runtime.hostagent` on a host through its connector.

One :meth:`HostAgent.call` is one command on the host, however many operations it carries; the
probes of one poll round share it. Requests go on stdin (they may carry the API key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from deploy.errors import CommandTimeout, ConnectorError
from deploy.hosts.connector import Connector
from deploy.runtime.hostagent import (
    FactsAnswer,
    GroupsAnswer,
    HomeAnswer,
    OkAnswer,
    ProcessesAnswer,
    ReadAnswer,
    RpcAnswer,
    StartAnswer,
    StatAnswer,
)

__all__ = ["HostAgent", "HttpAnswer", "http_op"]


@dataclass(frozen=True)
class HttpAnswer:
    """The answer of an ``http`` operation: a status and body, or the reason there was none."""

    status: int = 0
    body: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body parsed as JSON (None when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self) -> str:
        """One line: ``HTTP 500: Internal Server Error`` or ``connection refused``."""
        if self.error:
            return self.error
        return f"HTTP {self.status}: {' '.join(self.body.split())[:160]}"

    @classmethod
    def parse(cls, result: Mapping[str, Any]) -> HttpAnswer:
        """From the host agent's result dict."""
        return cls(int(result.get("status", 0)), str(result.get("body", "")), str(result.get("error", "")))


def http_op(
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    cafile: str | None = None,
) -> dict[str, Any]:
    """An ``http`` operation for :meth:`HostAgent.call` (``cafile``: the certificate to trust for https)."""
    op = {
        "op": "http",
        "method": method,
        "url": url,
        "json": json_body,
        "headers": dict(headers or {}),
        "timeout": timeout,
    }
    if cafile:
        op["cafile"] = cafile
    return op


class HostAgent:
    """Runs host-agent operations on one host.

    Args:
        connector: How to reach the host.
        python: The host's runtime interpreter (it has ``deploy`` and ``supervisor``).
    """

    def __init__(self, connector: Connector, python: str) -> None:
        self.connector = connector
        self.python = python

    @property
    def host(self) -> str:
        """The spec name of the host."""
        return self.connector.host

    def call(self, ops: Sequence[Mapping[str, Any]], *, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Run ``ops`` in one command and return one result per operation.

        Raises:
            ConnectorError: the agent could not run (no such python, no ``deploy`` package...).
        """
        if not ops:
            return []
        request = json.dumps({"ops": list(ops)}).encode()
        stream = self.connector.stream([self.python, "-m", "deploy.runtime.hostagent", "--serve"])
        if stream is not None and stream.lock.acquire(blocking=False):
            try:
                if not stream.broken:
                    return self._answers(stream.exchange(request, timeout=timeout), len(ops))
            except CommandTimeout:
                raise
            except ConnectorError:
                pass  # the agent died (or never started): a one-shot run below says why, or works
            finally:
                stream.lock.release()
        result = self.connector.run(
            [self.python, "-m", "deploy.runtime.hostagent"], stdin=request, timeout=timeout
        )
        if not result.ok:
            raise ConnectorError(
                self.host,
                f"{self.python} -m deploy.runtime.hostagent failed (exit {result.exit_code}): "
                f"{result.tail(1)}",
                hint=f"check hosts.{self.host}.python: it must be the host's runtime python, with "
                "agent-llm[serve] and supervisor installed",
            )
        return self._answers(result.stdout.encode(), len(ops))

    def _answers(self, raw: bytes, count: int) -> list[dict[str, Any]]:
        try:
            answers = json.loads(raw)
        except ValueError as exc:
            raise ConnectorError(self.host, f"unreadable host agent answer: {raw[:200]!r}") from exc
        if isinstance(answers, dict) and "agent_error" in answers:
            raise ConnectorError(self.host, f"the host agent failed: {answers['agent_error']}")
        if not isinstance(answers, list) or len(answers) != count:
            raise ConnectorError(self.host, "host agent answered the wrong number of results")
        return answers

    def one(self, op: Mapping[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
        """Run a single operation."""
        return self.call([op], timeout=timeout)[0]

    def http(self, method: str, url: str, **kwargs: Any) -> HttpAnswer:
        """One HTTP request made from the host."""
        return HttpAnswer.parse(self.one(http_op(method, url, **kwargs)))

    # Typed operations: each names the host agent's answer type (deploy.runtime.hostagent).

    def home(self) -> str:
        """The home directory of the user ``llm-deploy`` runs as there."""
        return cast(HomeAnswer, self.one({"op": "home"}))["home"]

    def stat(self, path: str) -> StatAnswer:
        """Whether ``path`` exists, and is a directory."""
        return cast(StatAnswer, self.one({"op": "stat", "path": path}))

    def rpc(self, socket: str, calls: Sequence[Sequence[Any]], *, timeout: float = 60.0) -> RpcAnswer:
        """supervisord XML-RPC calls over its unix socket."""
        return cast(RpcAnswer, self.one({"op": "rpc", "socket": socket, "calls": calls}, timeout=timeout))

    def start_supervisord(self, conf: str, *, timeout: float) -> StartAnswer:
        """Start supervisord with ``conf`` (it daemonizes)."""
        return cast(StartAnswer, self.one({"op": "start_supervisord", "conf": conf}, timeout=timeout))

    def process_groups(
        self, groups: Mapping[int, str], cluster: str, *, kill: bool = False
    ) -> dict[str, list[int]]:
        """Process group -> members, for the groups (named by their component) still holding
        processes of ``cluster``; with ``kill``, each found is SIGKILLed."""
        named = {str(g): c for g, c in groups.items()}
        op = {"op": "groups", "groups": named, "cluster": cluster, "kill": kill}
        return cast(GroupsAnswer, self.one(op))["left"]

    def processes(self, pids: Sequence[int]) -> dict[str, str]:
        """pid -> command line for those of ``pids`` still running."""
        return cast(ProcessesAnswer, self.one({"op": "processes", "pids": list(pids)}))["alive"]

    def read_part(self, path: str, **where: int) -> ReadAnswer:
        """A part of ``path``: ``tail_lines``, ``offset`` and ``max_bytes`` as the agent takes them."""
        return cast(ReadAnswer, self.one({"op": "read", "path": path, **where}))

    @staticmethod
    def facts(answer: Mapping[str, Any]) -> FactsAnswer:
        """A ``facts`` answer of a batch, typed."""
        return cast(FactsAnswer, answer)

    def read(self, path: str, *, tail_lines: int | None = None) -> str | None:
        """The text of ``path`` (its last ``tail_lines`` lines), or None when it does not exist."""
        answer = self.read_part(path, **({"tail_lines": tail_lines} if tail_lines else {}))
        return answer.get("text", "") if answer.get("exists") else None

    def prepare_state_dir(self, path: str) -> None:
        """Create or adopt the state directory (refused: a system location, a folder not ours)."""
        answer = cast(OkAnswer, self.one({"op": "state_dir", "path": path}))
        if not answer.get("ok"):
            raise ConnectorError(
                self.host,
                answer.get("error", f"cannot create {path}"),
                hint=f"set hosts.{self.host}.state_dir to a new folder of its own (doctor checks it)",
            )

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        """Create ``path`` (and parents) with ``mode``."""
        answer = cast(OkAnswer, self.one({"op": "mkdir", "path": path, "mode": mode}))
        if not answer.get("ok"):
            raise ConnectorError(self.host, answer.get("error", f"cannot create {path}"))
