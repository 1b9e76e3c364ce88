"""Helpers shared by the deploy unit tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import json
from typing import Any


def spec_data(state_dir: str = "/srv/llm/t") -> dict[str, Any]:
    """A one-host cluster spec, as parsed yaml, with fixed ports and paths."""
    return {
        "cluster": "t",
        "hosts": {"local": {"python": "/opt/venv/bin/python", "state_dir": state_dir}},
        "controller": {"host": "local", "port": 41001},
        "api_server": {"host": "local", "port": 41002},
        "models": [
            {
                "name": "tiny",
                "path": "/m/tiny",
                "conv_template": "qwen-7b-chat",
                "replicas": [{"host": "local", "port": 41003}],
            },
        ],
    }


class FakeHost:
    """Answers host-agent requests from a scripted state (for a RecordingConnector's replies).

    ``programs``: name -> supervisord process info (``statename``, ``pid``...).
    ``http``: URL -> (status, body) or an error string; a callable gets the op.
    ``files``: path -> text.
    """

    def __init__(self) -> None:
        self.programs: dict[str, dict[str, Any]] = {}
        self.http: dict[str, Any] = {}
        self.files: dict[str, str] = {}
        self.rpc_calls: list[list[Any]] = []
        self.supervisor_up = True

    def program(self, name: str, state: str = "RUNNING", pid: int = 100, **extra: Any) -> None:
        self.programs[name] = {
            "name": name,
            "statename": state,
            "pid": pid,
            "start": 1000,
            "now": 1060,
            "exitstatus": extra.pop("exitstatus", 0),
            "spawnerr": "",
            **extra,
        }

    def answer(self, op: dict[str, Any]) -> dict[str, Any]:
        kind = op["op"]
        if kind == "rpc":
            if not self.supervisor_up:
                return {"error": "no socket"}
            results: list[dict[str, Any]] = []
            for method, *args in op["calls"]:
                self.rpc_calls.append([method, *args])
                if method == "supervisor.getAllProcessInfo":
                    results.append({"ok": list(self.programs.values())})
                elif method == "supervisor.getPID":
                    results.append({"ok": 42})
                else:
                    results.append({"ok": True})
            return {"results": results}
        if kind == "http":
            reply = self.http.get(op["url"], "connection refused")
            if callable(reply):
                reply = reply(op)
            if isinstance(reply, str):
                return {"error": reply}
            status, body = reply
            return {"status": status, "body": body if isinstance(body, str) else json.dumps(body)}
        if kind == "read":
            text = self.files.get(op["path"])
            if text is None:
                return {"exists": False, "text": "", "size": 0}
            if op.get("tail_lines"):
                text = "\n".join(text.splitlines()[-op["tail_lines"] :])
            return {"exists": True, "text": text, "size": len(text), "end": len(text)}
        if kind == "bindable":
            return {"free": True, "error": ""}
        if kind in ("stat",):
            return {"exists": op["path"] in self.files, "is_dir": False}
        if kind == "home":
            return {"home": "/home/u"}
        if kind == "processes":
            return {"alive": {}}
        if kind == "groups":
            return {"left": {}}
        return {"ok": True}

    def reply(self, call: Any) -> Any:
        from deploy.testing import Reply

        request = json.loads(call.stdin)
        return Reply(stdout=json.dumps([self.answer(op) for op in request["ops"]]))
