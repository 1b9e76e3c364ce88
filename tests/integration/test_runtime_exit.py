"""A runtime process ends when its server stops, even with FastChat's non-daemon threads alive.

Upstream's controller keeps running after uvicorn fails to bind, because its heartbeat thread
is not a daemon. The port check catches the usual case before FastChat loads; this covers the
rest (the port taken between the check and the bind, or any other return of uvicorn).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, threading, time
from deploy.runtime._entry import serve

threading.Thread(target=time.sleep, args=(3600,)).start()  # non-daemon, like FastChat's heartbeat

async def app(scope, receive, send):
    pass

serve(app, component="probe", host="127.0.0.1", port=int(sys.argv[1]))
"""


def test_serve_exits_when_uvicorn_cannot_bind(tmp_path: Path) -> None:
    log = tmp_path / "probe.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    assert code == 1, output
    assert (
        output.splitlines()[-1]
        == f"probe: server on 127.0.0.1:{port} could not start or failed; see the lines above"
    )
    assert "address already in use" in output
