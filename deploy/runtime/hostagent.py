"""The host side of ``llm-deploy``: small questions and actions, run with the host's python.

``python -m deploy.runtime.hostagent`` reads ``{"ops": [...]}`` (JSON) on stdin, runs each
operation and prints one JSON list with a result per operation. With ``--serve`` it stays up and
answers one such request per line until end-of-file: ``llm-deploy`` keeps one agent per host
for a whole command (:meth:`deploy.hosts.connector.Connector.stream`), so a poll costs one round
trip, not a Python start. Batching keeps one round trip per host per poll, which matters over
SSH. Requests (including the API key of a probe) travel on stdin, so nothing secret shows in
``ps``.

Standard library only (plus supervisor's XML-RPC transport for ``rpc``): this runs on every
host, inside the runtime environment, many times per ``up``.

Operations (``op`` key), and what they answer:

- ``rpc`` ``socket, calls: [[method, *args], ...]`` -> ``{"results": [{"ok": value} |
  {"fault": code, "text": str}]}`` or ``{"error": "no socket" | str}``: supervisord XML-RPC.
- ``http`` ``method, url, json?, headers?, timeout?, cafile?`` -> ``{"status": int, "body": str}`` or
  ``{"error": str}``: one HTTP request, no proxies.
- ``bindable`` ``address, port`` -> ``{"free": bool, "error": str}``.
- ``read`` ``path, tail_lines?, offset?, max_bytes?`` -> ``{"exists": bool, "text": str, "size": int}``.
- ``stat`` ``path`` -> ``{"exists": bool, "is_dir": bool}``; ``mkdir`` ``path, mode``; ``home``.
- ``state_dir`` ``path`` -> ``{"ok": bool, "error": str}``: create or adopt the state directory
  (:func:`deploy.runtime.statedir.prepare`: never a system location or a folder not ours).
- ``processes`` ``pids`` -> ``{"alive": {pid: cmdline}}``.
- ``groups`` ``groups: {pgid: component}, cluster, kill?`` -> ``{"left": {pgid: [pid]}}``: the
  process groups still holding processes of the cluster's components (:mod:`.procgroup`), each
  SIGKILLed with ``kill``.
- ``signal`` ``pid, signal, must_contain`` -> ``{"sent": bool}``: only to a process whose command
  line contains ``must_contain`` (so a reused pid is never hit).
- ``start_supervisord`` ``conf`` -> ``{"exit_code": int, "output": str}``.
- ``facts`` ``dists, paths, ports: [[address, port]], gpus: bool, disk_path`` -> ``{"python",
  "executable", "versions": {dist: str|None}, "paths": {path: bool}, "ports": [bindable...],
  "gpus": {"present": bool, "indexes": [int], "error": str}, "disk_free": int, "time": float,
  "state_dir": str | None}`` (why ``state_dir`` would refuse ``disk_path``, or None)
  (``doctor``'s questions about one host, answered in one round trip).
- ``listen`` ``sockets: [[address, port]], seconds, expect, background?`` -> ``{"bound": [str],
  "peers": [str]}``: accept connections for a while (a stand-in for a component not yet
  started, so ``doctor`` can prove a port is reachable before anything listens on it). With
  ``background`` (an agent in ``--serve`` mode only), it answers once bound, with an ``id``,
  and keeps accepting in a thread, so the same agent can make its own connections meanwhile;
  ``listen_result`` ``id`` waits for the rest and answers the peers (the sockets are closed).
- ``connect`` ``address, port, timeout, retry_refused`` -> ``{"ok": bool, "error": str}``: a TCP
  connection from this host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any, TypedDict

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


# The answers, typed: the agent's functions return them and the client (deploy.hosts.agent) reads
# them through the same names, so mypy checks both ends of the protocol.


class RpcAnswer(TypedDict, total=False):
    results: list[dict[str, Any]]  # per call: {"ok": value} or {"fault": code, "text": str}
    error: str


class HttpResult(TypedDict, total=False):
    status: int
    body: str
    error: str  # the request failed before an HTTP status (refused, timed out, TLS)


class BindableAnswer(TypedDict):
    free: bool
    error: str


class ReadAnswer(TypedDict, total=False):
    exists: bool
    text: str
    size: int
    end: int
    error: str


class StatAnswer(TypedDict):
    exists: bool
    is_dir: bool


class OkAnswer(TypedDict):
    ok: bool
    error: str


class HomeAnswer(TypedDict):
    home: str


class ProcessesAnswer(TypedDict):
    alive: dict[str, str]  # pid -> command line, for the pids still running


class GroupsAnswer(TypedDict):
    left: dict[str, list[int]]  # process group -> its members, for the groups still ours


class SignalAnswer(TypedDict):
    sent: bool


class StartAnswer(TypedDict):
    exit_code: int
    output: str


class GpusAnswer(TypedDict):
    present: bool
    indexes: list[int]
    error: str


class FactsAnswer(TypedDict):
    python: str
    executable: str
    versions: dict[str, str | None]
    paths: dict[str, bool]
    ports: list[BindableAnswer]
    gpus: GpusAnswer
    disk_free: int
    time: float
    state_dir: str | None  # why the state directory is unsafe (None: it is fine)


class ListenAnswer(TypedDict, total=False):
    bound: list[str]
    peers: list[str]
    id: str  # a background listener's, for listen_result


Answer = (
    RpcAnswer
    | HttpResult
    | BindableAnswer
    | ReadAnswer
    | StatAnswer
    | OkAnswer
    | HomeAnswer
    | ProcessesAnswer
    | SignalAnswer
    | StartAnswer
    | FactsAnswer
    | ListenAnswer
)


# Background listeners of a --serve agent (op_listen), by id, until listen_result collects them.
_LISTENERS: dict[str, tuple[Any, ListenAnswer]] = {}
_LISTENER_IDS = iter(range(1, 1 << 62))
_SERVING = False


def op_rpc(req: dict[str, Any]) -> RpcAnswer:
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


def op_http(req: dict[str, Any]) -> HttpResult:
    # Imported here: urllib.request is ~40% of the agent's start, and most hosts' agents make no
    # HTTP request in a command (only the head's and engine hosts' do).
    import urllib.error
    import urllib.request

    body = None
    headers = dict(req.get("headers") or {})
    if req.get("json") is not None:
        body = json.dumps(req["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(  # noqa: S310
        req["url"], data=body, headers=headers, method=req.get("method", "GET")
    )
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if req.get("cafile"):
        import ssl

        # The API server's own certificate (api_server.tls.cert), trusted for this request only.
        try:
            context = ssl.create_default_context(cafile=req["cafile"])
        except (OSError, ssl.SSLError) as exc:
            return {"error": f"cannot use {req['cafile']} as the trusted certificate: {exc}"}
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        # The URLs are ones built by llm-deploy from the spec.
        with opener.open(request, timeout=float(req.get("timeout", 5))) as resp:
            return {"status": resp.status, "body": resp.read(MAX_BODY).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(MAX_BODY).decode("utf-8", "replace")}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"error": str(reason) or type(exc).__name__}


def op_bindable(req: dict[str, Any]) -> BindableAnswer:
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


def op_read(req: dict[str, Any]) -> ReadAnswer:
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


def op_stat(req: dict[str, Any]) -> StatAnswer:
    return {"exists": os.path.exists(req["path"]), "is_dir": os.path.isdir(req["path"])}


def op_mkdir(req: dict[str, Any]) -> OkAnswer:
    try:
        os.makedirs(req["path"], mode=int(req.get("mode", 0o700)), exist_ok=True)
        os.chmod(req["path"], int(req.get("mode", 0o700)))
    except OSError as exc:
        return {"ok": False, "error": f"cannot create {req['path']}: {exc.strerror or exc}"}
    return {"ok": True, "error": ""}


def op_state_dir(req: dict[str, Any]) -> OkAnswer:
    from deploy.runtime.statedir import prepare

    error = prepare(os.path.expanduser(req["path"]), int(req.get("mode", 0o700)))
    return {"ok": error is None, "error": error or ""}


def op_home(req: dict[str, Any]) -> HomeAnswer:
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


def op_processes(req: dict[str, Any]) -> ProcessesAnswer:
    alive = {}
    for pid in req["pids"]:
        cmd = _cmdline(int(pid)) if int(pid) > 0 else None
        if cmd is not None:
            alive[str(pid)] = cmd
    return {"alive": alive}


def op_groups(req: dict[str, Any]) -> GroupsAnswer:
    from deploy.runtime.procgroup import group_members, kill_group

    left = {}
    for group, component in req["groups"].items():
        members = group_members(int(group), req["cluster"], component)
        if members and req.get("kill"):
            kill_group(int(group))
        if members:
            left[str(group)] = members
    return {"left": left}


def op_signal(req: dict[str, Any]) -> SignalAnswer:
    pid = int(req["pid"])
    cmd = _cmdline(pid) if pid > 0 else None
    if not cmd or req["must_contain"] not in cmd:
        return {"sent": False}
    try:
        os.kill(pid, int(req["signal"]))
    except OSError:
        return {"sent": False}
    return {"sent": True}


def op_start_supervisord(req: dict[str, Any]) -> StartAnswer:
    env = {k: v for k, v in os.environ.items() if k in KEEP_ENV or k.startswith(KEEP_ENV_PREFIXES)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisord", "-c", req["conf"]],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
            # supervisord opens its own log before applying its umask=077: without this the
            # log would be created world-readable.
            umask=0o077,
        )
    except subprocess.TimeoutExpired:
        return {"exit_code": -1, "output": "supervisord did not daemonize within 60 s"}
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return {"exit_code": proc.returncode, "output": output}


def op_facts(req: dict[str, Any]) -> FactsAnswer:
    import importlib.metadata
    import shutil
    import time

    from deploy.runtime.statedir import check

    versions: dict[str, str | None] = {}
    for dist in req.get("dists", []):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    gpus: GpusAnswer = {"present": False, "indexes": [], "error": ""}
    if req.get("gpus"):
        gpus = _gpus(shutil.which("nvidia-smi"))
    disk = os.path.expanduser(req.get("disk_path") or "~")
    while not os.path.exists(disk) and disk not in ("/", ""):
        disk = os.path.dirname(disk)  # the state directory may not exist before the first up
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": versions,
        "paths": {p: os.path.exists(os.path.expanduser(p)) for p in req.get("paths", [])},
        "ports": [op_bindable({"address": a, "port": p}) for a, p in req.get("ports", [])],
        "gpus": gpus,
        "disk_free": shutil.disk_usage(disk or "/").free,
        "time": time.time(),
        "state_dir": check(os.path.expanduser(req["disk_path"])) if req.get("disk_path") else None,
    }


def _gpus(nvidia_smi: str | None) -> GpusAnswer:
    if nvidia_smi is None:
        return {"present": False, "indexes": [], "error": "nvidia-smi not found"}
    argv = [nvidia_smi, "--query-gpu=index", "--format=csv,noheader"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"present": True, "indexes": [], "error": str(exc)}
    if proc.returncode != 0:
        return {"present": True, "indexes": [], "error": (proc.stderr or proc.stdout).strip()[-300:]}
    indexes = [int(x) for x in proc.stdout.split() if x.strip().isdigit()]
    return {"present": True, "indexes": indexes, "error": ""}


def op_listen(req: dict[str, Any]) -> ListenAnswer:
    import selectors
    import time

    deadline = time.monotonic() + float(req.get("seconds", 10))
    expect = int(req.get("expect", 0))
    sel = selectors.DefaultSelector()
    bound: list[str] = []
    for address, port in req["sockets"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, int(port)))
            s.listen(16)
        except OSError:
            s.close()
            continue
        sel.register(s, selectors.EVENT_READ)
        bound.append(f"{address}:{port}")
    answer: ListenAnswer = {"bound": bound, "peers": []}
    if req.get("background") and _SERVING:
        import threading

        thread = threading.Thread(target=_accept, args=(sel, expect, deadline, answer["peers"]), daemon=True)
        thread.start()
        key = str(next(_LISTENER_IDS))
        _LISTENERS[key] = (thread, answer)
        return {**answer, "id": key}
    _accept(sel, expect, deadline, answer["peers"])
    return answer


def _accept(sel: Any, expect: int, deadline: float, peers: list[str]) -> None:
    """Accept on ``sel``'s sockets until ``expect`` peers connected or the deadline; close them."""
    import time

    # Stops early once every expected peer connected; the deadline bounds it otherwise.
    while sel.get_map() and len(peers) < expect and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(timeout=left):
            conn, peer = key.fileobj.accept()
            peers.append(peer[0])
            conn.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()


def op_listen_result(req: dict[str, Any]) -> ListenAnswer:
    thread, answer = _LISTENERS.pop(str(req["id"]))
    thread.join()
    return answer


def op_connect(req: dict[str, Any]) -> OkAnswer:
    from deploy.polling import DeadlineExceeded, poll_until

    timeout = float(req.get("timeout", 5))
    last = {"error": ""}

    def attempt() -> OkAnswer | None:
        try:
            with socket.create_connection((req["address"], int(req["port"])), timeout=timeout):
                return {"ok": True, "error": ""}
        except ConnectionRefusedError as exc:
            # A stand-in listener may still be starting on the other host: a refusal is retried
            # until the deadline; a timeout or an unreachable network is final.
            last["error"] = exc.strerror or "connection refused"
            return None if req.get("retry_refused") else {"ok": False, "error": last["error"]}
        except OSError as exc:
            error = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            return {"ok": False, "error": error}

    try:
        # A refusal costs nothing to ask again, and doctor waits on the slowest connect.
        return poll_until(attempt, seconds=timeout, what="connect", first_interval=0.02, max_interval=0.1)
    except DeadlineExceeded:
        return {"ok": False, "error": last["error"]}


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def answer(request: dict[str, Any]) -> list[Answer | dict[str, str]]:
    """One result per operation of ``request`` (``{"ops": [...]}``)."""
    results = []
    for op in request["ops"]:
        handler = OPS.get(op.get("op", ""))
        results.append(handler(op) if handler else {"error": f"unknown op {op.get('op')!r}"})
    return results


def serve() -> None:
    """``--serve``: answer one request per stdin line with one JSON line, until end-of-file.

    A request that fails answers ``{"agent_error": "..."}`` and the agent keeps serving.
    """
    global _SERVING
    _SERVING = True
    for line in iter(sys.stdin.buffer.readline, b""):
        try:
            reply: object = answer(json.loads(line))
        except Exception as exc:  # one bad request must not end the session
            reply = {"agent_error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> None:
    """Answer the operations read on stdin with one JSON list on stdout (``--serve``: many)."""
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    sys.stdout.write(json.dumps(answer(json.load(sys.stdin))))


if __name__ == "__main__":
    main()
