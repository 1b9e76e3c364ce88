"""The host side of ``llm-deploy``: small questions and actions, run with the host's python.

``python -m deploy.hostagent`` reads ``{"ops": [...]}`` (JSON) on stdin, runs each operation and
prints one JSON list with a result per operation. Batching keeps one round trip per host per
poll, which matters over SSH. Requests (including the API key of a probe) travel on stdin, so
nothing secret shows in ``ps``.

Standard library only (plus supervisor's XML-RPC transport for ``rpc``): this runs on every
host, inside the runtime environment, many times per ``up``.

Operations (``op`` key), and what they answer:

- ``rpc`` ``socket, calls: [[method, *args], ...]`` -> ``{"results": [{"ok": value} |
  {"fault": code, "text": str}]}`` or ``{"error": "no socket" | str}``: supervisord XML-RPC.
- ``http`` ``method, url, json?, headers?, timeout?`` -> ``{"status": int, "body": str}`` or
  ``{"error": str}``: one HTTP request, no proxies.
- ``bindable`` ``address, port`` -> ``{"free": bool, "error": str}``.
- ``read`` ``path, tail_lines?, offset?, max_bytes?`` -> ``{"exists": bool, "text": str, "size": int}``.
- ``stat`` ``path`` -> ``{"exists": bool, "is_dir": bool}``; ``mkdir`` ``path, mode``; ``home``.
- ``processes`` ``pids`` -> ``{"alive": {pid: cmdline}}``.
- ``signal`` ``pid, signal, must_contain`` -> ``{"sent": bool}``: only to a process whose command
  line contains ``must_contain`` (so a reused pid is never hit).
- ``start_supervisord`` ``conf`` -> ``{"exit_code": int, "output": str}``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

# The environment supervisord (and so every component) starts with: the login basics only.
# Proxies would break the components' calls to each other; CPU_ISA makes FastChat try IPEX.
KEEP_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
)
KEEP_ENV_PREFIXES = ("LD_LIBRARY_PATH", "CUDA_HOME", "HF_HOME")
MAX_BODY = 256 * 1024


def op_rpc(req: dict[str, Any]) -> dict[str, Any]:
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    path = req["socket"]
    if not os.path.exists(path):
        return {"error": "no socket"}
    transport = SupervisorTransport(None, None, f"unix://{path}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    results: list[dict[str, Any]] = []
    try:
        for method, *args in req["calls"]:
            target: Any = proxy
            for part in method.split("."):
                target = getattr(target, part)
            try:
                results.append({"ok": target(*args)})
            except xmlrpc.client.Fault as fault:
                results.append({"fault": fault.faultCode, "text": fault.faultString})
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "results": results}
    return {"results": results}


def op_http(req: dict[str, Any]) -> dict[str, Any]:
    body = None
    headers = dict(req.get("headers") or {})
    if req.get("json") is not None:
        body = json.dumps(req["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(  # noqa: S310
        req["url"], data=body, headers=headers, method=req.get("method", "GET")
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        # The URLs are http ones built by llm-deploy from the spec.
        with opener.open(request, timeout=float(req.get("timeout", 5))) as resp:
            return {"status": resp.status, "body": resp.read(MAX_BODY).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(MAX_BODY).decode("utf-8", "replace")}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"error": str(reason) or type(exc).__name__}


def op_bindable(req: dict[str, Any]) -> dict[str, Any]:
    # Bind as uvicorn will (SO_REUSEADDR), so a port in TIME_WAIT counts as free.
    try:
        infos = socket.getaddrinfo(req["address"], req["port"], type=socket.SOCK_STREAM)
    except OSError as exc:
        return {"free": False, "error": f"cannot resolve {req['address']}: {exc}"}
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                return {"free": False, "error": exc.strerror or str(exc)}
    return {"free": True, "error": ""}


def op_read(req: dict[str, Any]) -> dict[str, Any]:
    path = req["path"]
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            max_bytes = int(req.get("max_bytes", MAX_BODY))
            if "offset" in req:
                f.seek(min(int(req["offset"]), size))
            else:
                f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
            end = f.tell()
    except FileNotFoundError:
        return {"exists": False, "text": "", "size": 0}
    except OSError as exc:
        return {"exists": True, "text": "", "size": 0, "error": exc.strerror or str(exc)}
    text = data.decode("utf-8", "replace")
    if req.get("tail_lines"):
        text = "\n".join(text.splitlines()[-int(req["tail_lines"]) :])
    return {"exists": True, "text": text, "size": size, "end": end}


def op_stat(req: dict[str, Any]) -> dict[str, Any]:
    return {"exists": os.path.exists(req["path"]), "is_dir": os.path.isdir(req["path"])}


def op_mkdir(req: dict[str, Any]) -> dict[str, Any]:
    try:
        os.makedirs(req["path"], mode=int(req.get("mode", 0o700)), exist_ok=True)
        os.chmod(req["path"], int(req.get("mode", 0o700)))
    except OSError as exc:
        return {"ok": False, "error": f"cannot create {req['path']}: {exc.strerror or exc}"}
    return {"ok": True}


def op_home(req: dict[str, Any]) -> dict[str, Any]:
    return {"home": os.path.expanduser("~")}


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""


def op_processes(req: dict[str, Any]) -> dict[str, Any]:
    alive = {}
    for pid in req["pids"]:
        cmd = _cmdline(int(pid)) if int(pid) > 0 else None
        if cmd is not None:
            alive[str(pid)] = cmd
    return {"alive": alive}


def op_signal(req: dict[str, Any]) -> dict[str, Any]:
    pid = int(req["pid"])
    cmd = _cmdline(pid) if pid > 0 else None
    if not cmd or req["must_contain"] not in cmd:
        return {"sent": False}
    try:
        os.kill(pid, int(req["signal"]))
    except OSError:
        return {"sent": False}
    return {"sent": True}


def op_start_supervisord(req: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k in KEEP_ENV or k.startswith(KEEP_ENV_PREFIXES)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", req["conf"]],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"exit_code": -1, "output": "supervisord did not daemonize within 60 s"}
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return {"exit_code": proc.returncode, "output": output}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def main() -> None:
    """Answer the operations read on stdin with one JSON list on stdout."""
    request = json.load(sys.stdin)
    results = []
    for op in request["ops"]:
        handler = OPS.get(op.get("op", ""))
        results.append(handler(op) if handler else {"error": f"unknown op {op.get('op')!r}"})
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
