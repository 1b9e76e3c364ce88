"""``python -m deploy.runtime.slurm_job``: a worker replica as the main process of a Slurm batch job.

Usage (the batch script ``llm-deploy up`` writes ``exec``s this, so Slurm's batch signals reach it)::

    python -m deploy.runtime.slurm_job --controller-address URL --url-file PATH
        --registration-secret-file PATH [--resubmit-script PATH --job-file PATH]
        [--drain-wait SECONDS] [--engine-argv JSON]
        -- <the worker's flags, without --host/--port/--worker-address>

The worker is :mod:`deploy.runtime.model_worker` (the ``hf`` kind); with ``--engine-argv`` (the
``vllm`` kind: ``vllm serve``'s command line as a JSON list) it is the bridge
(:mod:`deploy.runtime.vllm_bridge`), in front of that engine, which the job starts on a free
loopback port (the value of its ``--port`` is replaced) and supervises
(:mod:`deploy.runtime.slurm_engine`).

On the node Slurm allocated it:

1. picks the node's cluster address: the source address of its route to the controller (never
   loopback: FastChat #2810, a worker advertising 127.0.0.1 is unreachable);
2. picks a free port on that address;
3. writes ``{"job_id", "node", "url", "registered"}`` to ``--url-file`` (storage the login
   node shares), so ``llm-deploy status`` and ``up`` know where the replica is, and a job
   handing over knows when its replacement serves;
4. runs the worker bound to that address and port, registering at that URL (with
   ``--registration-secret-file``: the controller cannot list the URL in advance).

``SIGUSR1`` (``sbatch --signal=B:USR1@<grace>``, sent before the time limit) starts the hand-over
of :mod:`deploy.runtime.drain`: a replacement job first, then out of rotation, then a graceful
stop that finishes the running requests.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from deploy.runtime._entry import fail
from deploy.runtime.errors import StartupError

__all__ = ["main", "node_address", "reach_controller"]

COMPONENT = "slurm_job"
logger = logging.getLogger(f"deploy.runtime.{COMPONENT}")


def node_address(controller_address: str) -> str:
    """This node's address on the route to the controller (a UDP connect sends nothing)."""
    parsed = urllib.parse.urlsplit(controller_address)
    if not parsed.hostname:
        raise ValueError(f"--controller-address {controller_address!r}: no host")
    family = socket.AF_INET6 if ":" in parsed.hostname else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((parsed.hostname, parsed.port or 80))
        address = str(probe.getsockname()[0])
    if ipaddress.ip_address(address).is_loopback:
        raise ValueError(
            f"this node reaches the controller {controller_address} over loopback ({address}): "
            "the controller must bind an address the compute nodes reach"
        )
    return address


def reach_controller(controller_address: str, seconds: float = 30.0) -> None:
    """Return once a TCP connection to the controller works (refusals retried for ``seconds``).

    Raises:
        OSError: it never did; the message says what the last attempt got.
    """
    from deploy.polling import DeadlineExceeded, poll_until

    parsed = urllib.parse.urlsplit(controller_address)
    last: list[OSError] = []

    def attempt() -> bool | None:
        try:
            with socket.create_connection((parsed.hostname or "", parsed.port or 80), timeout=5):
                return True
        except OSError as exc:
            last[:] = [exc]
            return None

    try:
        poll_until(attempt, seconds=seconds, what="the controller", max_interval=2.0)
    except DeadlineExceeded:
        raise OSError(f"{last[0] if last else 'no answer'} for {seconds:.0f} s") from None


def free_port(address: str) -> int:
    """A port free on ``address`` now (the worker binds it a moment later)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _write_url_file(path: Path, url: str, *, registered: bool = False) -> None:
    job = os.environ.get("SLURM_JOB_ID", "")
    if registered:  # only while the record is still this job's (a replacement writes its own)
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("job_id") != job:
                return
        except (OSError, ValueError, AttributeError):
            return
    record = {
        "job_id": job,
        "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        "url": url,
        "registered": registered,
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> None:
    """Pick address and port, record them, run the worker; never returns."""
    parser = argparse.ArgumentParser(prog="python -m deploy.runtime.slurm_job", allow_abbrev=False)
    parser.add_argument("--controller-address", required=True)
    parser.add_argument("--url-file", type=Path, required=True)
    parser.add_argument("--registration-secret-file", type=Path, required=True)
    parser.add_argument("--resubmit-script", type=Path, help="submitted again at SIGUSR1 (the replacement)")
    parser.add_argument("--job-file", type=Path, help="the replica's .job record (the replacement's id)")
    parser.add_argument("--drain-wait", type=float, default=120.0, help="seconds to wait for the replacement")
    parser.add_argument(
        "--engine-argv", type=_argv_list, help="the vllm kind: the engine's command line, a JSON list"
    )
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = list(args.worker_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    for flag in ("--host", "--port", "--worker-address", "--registration-secret-file", "--upstream"):
        if flag in rest:
            fail(COMPONENT, f"{flag} is picked by the job; do not pass it")
    try:
        address = node_address(args.controller_address)
        port = free_port(address)
    except (OSError, ValueError) as exc:
        fail(COMPONENT, f"cannot pick this node's address and port: {exc}")
    try:
        reach_controller(args.controller_address)
    except OSError as exc:
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        fail(
            COMPONENT,
            f"node {node} ({address}) cannot reach the controller at {args.controller_address}: {exc}; "
            "the compute nodes must reach the controller's address and port (a firewall?)",
        )
    url = f"http://{address}:{port}" if ":" not in address else f"http://[{address}]:{port}"
    try:
        _write_url_file(args.url_file, url)
    except OSError as exc:
        fail(COMPONENT, f"cannot write {args.url_file} (is the state dir on shared storage?): {exc}")
    from deploy.runtime.drain import Drain
    from deploy.runtime.registration import read_secret

    try:
        secret = read_secret(args.registration_secret_file)
    except StartupError as exc:
        fail(COMPONENT, str(exc))
    name = os.environ.get("LLM_DEPLOY_COMPONENT", "worker")
    drain = Drain(
        name, args.controller_address, url, secret, args.url_file,
        args.resubmit_script, args.job_file, args.drain_wait,
    )  # fmt: skip
    signal.signal(signal.SIGUSR1, drain.on_signal)
    from deploy.runtime.registration import ON_REGISTERED

    # The record says when the controller took this worker: what a predecessor's hand-over waits for.
    ON_REGISTERED.append(lambda: _write_url_file(args.url_file, url, registered=True))
    sys.stderr.write(f"{COMPONENT}: job {os.environ.get('SLURM_JOB_ID', '?')} serves at {url}\n")
    worker_argv = [*rest, "--host", address, "--port", str(port), "--worker-address", url]
    worker_argv += ["--registration-secret-file", str(args.registration_secret_file)]
    worker_argv += ["--controller-address", args.controller_address]
    if args.engine_argv is not None:
        _serve_with_engine(args.engine_argv, worker_argv, name)
    from deploy.runtime import model_worker

    model_worker.main(worker_argv)


def _serve_with_engine(engine_argv: list[str], bridge_argv: list[str], name: str) -> NoReturn:
    """The vllm kind: the engine on a free loopback port, the bridge in front; never returns."""
    from deploy.runtime._entry import BEFORE_EXIT
    from deploy.runtime.slurm_engine import Engine, with_port
    from deploy.runtime.vllm_bridge import cli

    try:
        engine_port = free_port("127.0.0.1")
        argv = with_port(engine_argv, engine_port)
    except (OSError, ValueError) as exc:
        fail(COMPONENT, f"cannot start the engine: {exc}")

    def gone(reason: str) -> None:
        sys.stderr.write(f"{COMPONENT}: {reason}: ending the job\n")
        os.kill(os.getpid(), signal.SIGTERM)

    engine = Engine(argv, gone, os.environ.get("LLM_DEPLOY_CLUSTER", ""), name)

    def on_term(signum: int, frame: object) -> None:
        # uvicorn takes SIGTERM while it serves and raises it again once it stopped: the engine
        # stops after the bridge finished its requests, then the job ends by that signal.
        engine.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    BEFORE_EXIT.append(engine.stop)
    engine.start()
    cli.main([*bridge_argv, "--upstream", f"http://127.0.0.1:{engine_port}"])
    raise AssertionError("the bridge returned")  # cli.main ends the process


def _argv_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError("must be a JSON list of strings")
    return value


if __name__ == "__main__":
    main()
