"""A component's process group, found by what its members carry (``/proc``, Linux).

supervisord makes every program a process-group leader, and a component's children stay in
its group: vLLM's engine core (``VLLM::EngineCore``) and its workers outlive a server that was
killed, and for a moment even one that was stopped. A group id can be recycled once its last
member is gone, so a group counts as the component's only while a member carries the
component's ``LLM_DEPLOY_CLUSTER`` and ``LLM_DEPLOY_COMPONENT`` (the environment every
supervised program gets).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["group_members", "kill_group"]


def group_members(group: int, cluster: str, component: str, proc: Path = Path("/proc")) -> list[int]:
    """The pids in process group ``group`` when it is component ``component``'s, else ``[]``."""
    mine = {"LLM_DEPLOY_COMPONENT": component, "LLM_DEPLOY_CLUSTER": cluster}
    members, ours = [], False
    for entry in proc.glob("[0-9]*"):
        try:
            # After the ")" closing the name: state, ppid, pgrp. A zombie holds nothing.
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) != group or state == "Z":
                continue
            env = dict(
                item.split("=", 1)
                for item in (entry / "environ").read_text(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if int(entry.name) == os.getpid():
            continue
        members.append(int(entry.name))
        ours = ours or all(env.get(k) == v for k, v in mine.items())
    return members if ours else []


def kill_group(group: int) -> None:
    """SIGKILL every process of ``group`` (gone meanwhile: nothing to do)."""
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)
