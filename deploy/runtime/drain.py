"""A Slurm job's exit before its time limit: replacement first, then out of rotation, then stop.

On ``SIGUSR1`` (``sbatch --signal=B:USR1@<grace>``) :class:`Drain` runs once, in a thread:

1. submits the replica's own batch script again (``sbatch``, from the node: Slurm clients work
   inside jobs) and records the new job id in the replica's ``.job`` record, so ``down``
   cancels it too;
2. waits, up to ``wait`` seconds, until that job's worker is registered (its ``.url`` record
   says so), so capacity does not drop;
3. takes this worker out of rotation (the controller's ``/drain_worker``) and stops its
   re-registration;
4. waits ``settle`` seconds for requests routed just before, then stops gracefully (SIGTERM:
   uvicorn finishes the requests it runs, then exits).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.polling import DeadlineExceeded, poll_until
from deploy.runtime.allowlist import REGISTRATION_HEADER
from deploy.runtime.registration import DRAINING

__all__ = ["Drain"]

logger = logging.getLogger("deploy.runtime.slurm_job.drain")


def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 (the controller's http URL from our own command line)
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as answer:
        return json.loads(answer.read() or b"null")


@dataclass
class Drain:
    """What a job needs to hand over and leave (see the module docstring)."""

    name: str
    controller: str
    url: str
    secret: str
    url_file: Path
    script: Path | None = None
    job_file: Path | None = None
    wait: float = 120.0
    settle: float = 3.0

    def __post_init__(self) -> None:
        self._started = threading.Event()

    def on_signal(self, signum: int, frame: object) -> None:
        """The SIGUSR1 handler: start the drain once."""
        if not self._started.is_set():
            self._started.set()
            threading.Thread(target=self.run, name="drain", daemon=True).start()

    def run(self) -> None:
        """Hand over, leave rotation, stop."""
        logger.warning("%s: time limit near: submitting a replacement, then draining", self.name)
        try:
            job = self._resubmit()
            if job is not None:
                self._wait_for(job)
        except Exception:  # never keep a job past its limit because the hand-over failed
            logger.exception("%s: replacement failed; draining anyway", self.name)
        DRAINING.set()
        try:
            answer = _post(
                f"{self.controller}/drain_worker",
                {"worker_name": self.url},
                {REGISTRATION_HEADER: self.secret},
            )
            logger.warning("%s: out of rotation (%s)", self.name, answer)
        except OSError as exc:
            logger.error("%s: /drain_worker failed (%s): the heartbeat expiry takes it out", self.name, exc)
        time.sleep(self.settle)
        os.kill(os.getpid(), signal.SIGTERM)

    def _resubmit(self) -> str | None:
        if self.script is None:
            return None
        # This job's own SLURM_* variables would leak into the new job's options.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_")) or k == "SLURM_CONF"
        }
        done = subprocess.run(
            ["sbatch", "--parsable", str(self.script)], capture_output=True, text=True, env=env, timeout=60
        )
        job = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job.isdigit():
            logger.error("%s: sbatch failed (%d): %s", self.name, done.returncode, done.stderr.strip())
            return None
        logger.warning("%s: replacement job %s submitted", self.name, job)
        if self.job_file is not None:
            record = json.loads(self.job_file.read_text()) if self.job_file.exists() else {}
            record.update(replica=self.name, job_id=job)
            tmp = self.job_file.with_name(f".{self.job_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record) + "\n")
            tmp.chmod(0o600)
            tmp.replace(self.job_file)
        return job

    def _wait_for(self, job: str) -> None:
        # The replacement marks its record once the controller took it (the controller's own
        # registry reads are for the cluster's hosts, not the compute nodes).
        def registered() -> bool | None:
            try:
                record = json.loads(self.url_file.read_text())
            except (OSError, ValueError):
                return None
            ok = isinstance(record, dict) and str(record.get("job_id")) == job and record.get("registered")
            return True if ok else None

        try:
            poll_until(registered, seconds=self.wait, what=f"job {job} to register", max_interval=1.0)
            logger.warning("%s: replacement job %s serves", self.name, job)
        except DeadlineExceeded:
            logger.error(
                "%s: replacement job %s not serving after %.0f s: draining anyway", self.name, job, self.wait
            )
