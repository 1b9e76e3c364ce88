"""Throwaway test hosts: network namespaces on a private bridge, each with its own sshd.

Every host is a network namespace with its own address, its own hostname (UTS namespace) and
its own sshd that accepts only the generated client key, so code that drives real hosts over
SSH (Fabric, Ansible, ``llm-deploy``) can be tested on one machine. Needs root, ``ip``
(iproute2), ``unshare`` and OpenSSH's ``sshd``/``ssh``/``ssh-keygen``.

    python -m devtools.testhosts up --hosts head,w1,w2 --dir /tmp/hosts
    ssh -F /tmp/hosts/ssh_config w1 hostname
    python -m devtools.testhosts down --dir /tmp/hosts

Everything one run creates carries its run id (namespaces ``al-<id>-<host>``, links
``al<id>br`` and ``al<id>v<i>``) and is written to ``DIR/state.json`` *before* it is created,
so ``down`` removes exactly that, also after an ``up`` that died halfway. Processes are found
by namespace (``ip netns pids``), never by name. The subnet is a random private /24 that no
address or route on the machine overlaps. There is no NAT and no default route: hosts reach
each other and the root namespace (the bridge's address), nothing else.

Left on the machine by design: ``/run/sshd`` (sshd's privilege separation directory, shared
with any other sshd) and ``/run/netns`` (iproute2's mount point, shared with other runs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from deploy.polling import DeadlineExceeded, poll_until

SSHD = "/usr/sbin/sshd"
NETNS_DIR = Path("/run/netns")
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# Paths go into sshd_config and ssh_config unquoted; keep them to characters both parse alike.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./@+-]+$")
_PRIVATE = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
_FILES = ("id_ed25519", "id_ed25519.pub", "authorized_keys", "known_hosts", "ssh_config")


class TestHostsError(Exception):
    """Test hosts could not be created or removed; the message says why and what to do."""

    __test__ = False


@dataclass(frozen=True)
class Testbed:
    """A running set of test hosts (what ``up`` returns and the pytest fixture yields)."""

    __test__ = False  # not a pytest test class

    run_id: str
    dir: Path
    hosts: Mapping[str, str]  # name -> address
    netns: Mapping[str, str]  # name -> network namespace
    sshd_pids: Mapping[str, int]  # name -> sshd's pid (every process of a host: `ip netns pids`)
    bridge_address: str  # the root namespace's address on the hosts' subnet
    user: str
    key_file: Path
    ssh_config: Path  # Host entries per name and address; host key checking on
    known_hosts: Path  # lines for "name,address"

    def in_host(self, host: str, argv: Sequence[str]) -> list[str]:
        """Return argv that runs ``argv`` inside ``host``'s network namespace, bypassing SSH."""
        return ["ip", "netns", "exec", self.netns[host], *argv]


def missing_requirements() -> str | None:
    """Say why test hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, a bridge, sshd with root login)"
    tools = {
        "ip": "iproute2",
        "unshare": "util-linux",
        "ssh": "openssh-client",
        "ssh-keygen": "openssh-client",
    }
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    missing += [] if Path(SSHD).is_file() else ["openssh-server"]
    return f"missing {', '.join(missing)}: run scripts/system-deps.sh as root" if missing else None


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    if check and proc.returncode != 0:
        raise TestHostsError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pick_subnet() -> ipaddress.IPv4Network:
    """A random private /24 that no address or route on this machine overlaps."""
    seen = (
        _run(["ip", "-4", "-o", "addr"]).stdout + _run(["ip", "-4", "route", "show", "table", "all"]).stdout
    )
    taken = [
        ipaddress.IPv4Network(w, strict=False) for w in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", seen)
    ]
    rng = random.SystemRandom()
    for _ in range(500):
        space = rng.choice(_PRIVATE)
        net = ipaddress.IPv4Network(
            (int(space.network_address) + 256 * rng.randrange(space.num_addresses // 256), 24)
        )
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise TestHostsError("no free private /24: every candidate overlaps an address or route here")


def _write_state(directory: Path, state: Mapping[str, Any]) -> None:
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(directory / "state.json")


def _load_state(directory: Path) -> dict[str, Any] | None:
    path = directory / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def _sshd_config(d: Path, name: str, address: str, directory: Path, penalties: bool) -> str:
    lines = [
        f"ListenAddress {address}:22",
        f"HostKey {d}/ssh_host_ed25519_key",
        f"PidFile {d}/sshd.pid",
        f"AuthorizedKeysFile {directory}/authorized_keys",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",  # the one authorized_keys file would otherwise admit every local user
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "StrictModes no",  # the key lives under a world-writable tmp dir, which StrictModes rejects
        "UsePAM no",  # PAM is what sets LANG on a real host: SetEnv says it instead
        f"SetEnv AL_TESTHOST={name} LANG=C.UTF-8",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 100:30:200",  # Fabric and Ansible connect in bursts; 10:30:100 drops some
        "MaxSessions 100",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
    ]
    if penalties:  # OpenSSH >= 9.8 would lock out our source address after deliberate auth failures
        lines.append("PerSourcePenalties no")
    return "\n".join(lines) + "\n"


def _openssh_version() -> tuple[int, int]:
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", _run(["ssh", "-V"]).stderr)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def _ssh_config(hosts: Mapping[str, str], directory: Path) -> str:
    entries = [f"Host {name}\n    HostName {addr}\n" for name, addr in hosts.items()]
    common = [
        f"Host {' '.join([*hosts, *hosts.values()])}",
        "User root",
        f"IdentityFile {directory}/id_ed25519",
        "IdentitiesOnly yes",
        f"UserKnownHostsFile {directory}/known_hosts",
        "GlobalKnownHostsFile /dev/null",
        "StrictHostKeyChecking yes",
        "CheckHostIP no",
        "BatchMode yes",
        "ConnectTimeout 5",
        # sntrup761 costs ~80 ms a connection on small machines, and tests connect a lot.
        "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
        "LogLevel ERROR",
    ]
    return "\n".join(entries) + "\n" + "\n    ".join(common) + "\n"


def _keygen(path: Path, comment: str) -> str:
    """Make an ed25519 key pair at ``path``; return the public key as ``type base64``."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def _tail(path: Path, n: int = 10) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


def up(names: Sequence[str], directory: Path, *, timeout: float = 20.0) -> Testbed:
    """Create one test host per name under ``directory``; return once each accepts an SSH login.

    Raises:
        TestHostsError: a requirement is missing, a name is invalid, ``directory`` already holds
            a run, or a step failed (then everything made so far has been removed).
    """
    if reason := missing_requirements():
        raise TestHostsError(reason)
    if not names or len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
        raise TestHostsError(f"host names must be unique and match {_NAME.pattern}: got {list(names)}")
    directory = directory.resolve()
    if not _SAFE_PATH.match(str(directory)):
        raise TestHostsError(f"{directory}: use a directory path of letters, digits and ._-/@+ only")
    created_dir = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "state.json").exists():
        down_cmd = f"python -m devtools.testhosts down --dir {directory}"
        raise TestHostsError(f"{directory} already holds test hosts: run `{down_cmd}` first")
    run_id = secrets.token_hex(3)  # 16M ids; names are also checked by `ip` itself (File exists)
    subnet = _pick_subnet()
    addrs = [str(a) for a in subnet.hosts()]
    state: dict[str, Any] = {
        "run_id": run_id,
        "subnet": str(subnet),
        "bridge": f"al{run_id}br",
        "bridge_address": addrs[0],
        "created_dir": created_dir,
        "hosts": [
            {"name": n, "address": addrs[i + 1], "netns": f"al-{run_id}-{n}", "veth": f"al{run_id}v{i}"}
            for i, n in enumerate(names)
        ],
    }
    _write_state(directory, state)  # before creating anything, so `down` can undo a partial `up`
    try:
        _create(state, directory, timeout)
    except BaseException:
        down(directory)
        raise
    return _testbed(state, directory)


def _create(state: dict[str, Any], directory: Path, timeout: float) -> None:
    bridge, prefix = state["bridge"], state["subnet"].split("/")[1]
    _run(["ip", "link", "add", bridge, "type", "bridge"])
    _run(["ip", "addr", "add", f"{state['bridge_address']}/{prefix}", "dev", bridge])
    _run(["ip", "link", "set", bridge, "up"])
    for h in state["hosts"]:
        ns = h["netns"]
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", h["veth"], "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", h["veth"], "master", bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{h['address']}/{prefix}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    client_key = _keygen(directory / "id_ed25519", f"testhosts-{state['run_id']}")
    (directory / "authorized_keys").write_text(client_key + "\n")
    penalties = _openssh_version() >= (9, 8)
    known = []
    for h in state["hosts"]:
        d = directory / "hosts" / h["name"]
        d.mkdir(parents=True, exist_ok=True)
        known.append(f"{h['name']},{h['address']} {_keygen(d / 'ssh_host_ed25519_key', h['name'])}\n")
        (d / "sshd_config").write_text(_sshd_config(d, h["name"], h["address"], directory, penalties))
    (directory / "known_hosts").write_text("".join(known))
    (directory / "ssh_config").write_text(
        _ssh_config({h["name"]: h["address"] for h in state["hosts"]}, directory)
    )

    # sshd refuses to start without its privilege separation directory (normally made by systemd).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    for h in state["hosts"]:
        d = directory / "hosts" / h["name"]
        _run([SSHD, "-t", "-f", f"{d}/sshd_config"])
        # A UTS namespace gives the host its own hostname; sshd daemonises and writes its pid file.
        script = 'hostname "$1" && exec "$2" -f "$3" -E "$4"'
        sshd = ["sh", "-c", script, "sh", h["name"], SSHD, f"{d}/sshd_config", f"{d}/sshd.log"]
        _run(["ip", "netns", "exec", h["netns"], "unshare", "--uts", *sshd])
    _wait_for_logins(state, directory, timeout)
    for h in state["hosts"]:
        h["sshd_pid"] = int((directory / "hosts" / h["name"] / "sshd.pid").read_text())
    _write_state(directory, state)


def _wait_for_logins(state: Mapping[str, Any], directory: Path, timeout: float) -> None:
    """Log in to every host with the generated ssh_config: proves address, sshd, key and known_hosts."""
    pending = {h["name"] for h in state["hosts"]}
    argv = ["ssh", "-F", str(directory / "ssh_config")]

    def all_logged_in() -> bool | None:
        quiet = subprocess.DEVNULL
        procs = {n: subprocess.Popen([*argv, n, "true"], stdout=quiet, stderr=quiet) for n in pending}
        pending.difference_update(n for n, proc in procs.items() if proc.wait(timeout=30) == 0)
        return True if not pending else None

    try:
        poll_until(all_logged_in, seconds=timeout, what="SSH logins", first_interval=0.05, max_interval=0.25)
    except DeadlineExceeded as exc:
        logs = [f"--- {n}/sshd.log\n{_tail(directory / 'hosts' / n / 'sshd.log')}" for n in sorted(pending)]
        raise TestHostsError("\n".join([f"{exc} on {', '.join(sorted(pending))}", *logs])) from None


def _testbed(state: Mapping[str, Any], directory: Path) -> Testbed:
    return Testbed(
        run_id=state["run_id"],
        dir=directory,
        hosts={h["name"]: h["address"] for h in state["hosts"]},
        netns={h["name"]: h["netns"] for h in state["hosts"]},
        sshd_pids={h["name"]: h["sshd_pid"] for h in state["hosts"]},
        bridge_address=state["bridge_address"],
        user="root",
        key_file=directory / "id_ed25519",
        ssh_config=directory / "ssh_config",
        known_hosts=directory / "known_hosts",
    )


def netns_pids(netns: str) -> list[int]:
    """Live processes in ``netns`` (zombies are not listed: they have left every namespace)."""
    if not (NETNS_DIR / netns).exists():
        return []
    return [int(p) for p in _run(["ip", "netns", "pids", netns], check=False).stdout.split()]


def host_processes(testbed: Testbed, host: str) -> list[str]:
    """Command lines of every process in ``host``'s namespace except its sshd and sessions."""
    lines = []
    for pid in netns_pids(testbed.netns[host]):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except (OSError, IndexError):
            continue
        if state != "Z" and cmd and not cmd.startswith(("sshd", "/usr/sbin/sshd")):
            lines.append(f"{pid} {cmd}")
    return lines


def _signal_all(netns: str, sig: signal.Signals) -> None:
    for pid in netns_pids(netns):
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            os.kill(pid, sig)


def _stop_processes(netns: str) -> None:
    def empty() -> bool | None:
        return True if not netns_pids(netns) else None

    _signal_all(netns, signal.SIGTERM)
    try:
        poll_until(
            empty, seconds=3.0, what=f"processes in {netns} to exit", first_interval=0.02, max_interval=0.2
        )
    except DeadlineExceeded:
        _signal_all(netns, signal.SIGKILL)
        try:
            poll_until(empty, seconds=5.0, what=f"processes in {netns} to die", first_interval=0.02)
        except DeadlineExceeded as exc:
            raise TestHostsError(f"{exc}: pids {netns_pids(netns)} survived SIGKILL") from None


def down(directory: Path) -> None:
    """Remove what the run in ``directory`` made: processes, veths, namespaces, bridge, files.

    Idempotent, and safe after a failed or interrupted ``up``.
    """
    directory = directory.resolve()
    state = _load_state(directory)
    if state is None:
        return
    for h in state["hosts"]:
        # `ip netns del` with live processes only drops the name: the namespace (and sshd) live on.
        _stop_processes(h["netns"])
        # Delete the veth ourselves: after `netns del` the kernel removes it asynchronously.
        _run(["ip", "link", "del", h["veth"]], check=False)
        if (NETNS_DIR / h["netns"]).exists():
            _run(["ip", "netns", "del", h["netns"]])
    _run(["ip", "link", "del", state["bridge"]], check=False)
    shutil.rmtree(directory / "hosts", ignore_errors=True)
    for name in _FILES:
        (directory / name).unlink(missing_ok=True)
    (directory / "state.json").unlink()
    if state["created_dir"] and not any(directory.iterdir()):
        directory.rmdir()


def _port_open(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1.0):
            return True
    except OSError:
        return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Throwaway SSH test hosts in network namespaces (root only)."""


_dir_option = click.option(
    "--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Holds keys, ssh_config, known_hosts, sshd logs and the state file.",
)  # fmt: skip


@main.command("up")
@click.option("--hosts", "names", default="head,w1,w2", show_default=True, help="Comma-separated host names.")
@_dir_option
def up_command(names: str, directory: Path) -> None:
    """Create the hosts and wait until each accepts an SSH login."""
    start = time.monotonic()
    try:
        bed = up([n.strip() for n in names.split(",") if n.strip()], directory)
    except TestHostsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"✓ {len(bed.hosts)} hosts up in {time.monotonic() - start:.1f}s (run {bed.run_id})")
    for name, addr in bed.hosts.items():
        click.echo(f"  {name:<10} {addr:<15} netns {bed.netns[name]}")
    click.echo(f"  try:  ssh -F {bed.ssh_config} {next(iter(bed.hosts))} hostname")
    click.echo(f"  stop: python -m devtools.testhosts down --dir {bed.dir}")


@main.command("down")
@_dir_option
def down_command(directory: Path) -> None:
    """Stop every process in the hosts; remove namespaces, links and the generated files."""
    start = time.monotonic()
    try:
        down(directory)
    except TestHostsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"✓ down in {time.monotonic() - start:.1f}s")


@main.command("status")
@_dir_option
def status_command(directory: Path) -> None:
    """Show each host's address, namespace, sshd and port 22; exit 1 unless all are up."""
    state = _load_state(directory.resolve())
    if state is None:
        raise click.ClickException(f"{directory}: no test hosts here (no state.json)")
    healthy = True
    for h in state["hosts"]:
        alive = h.get("sshd_pid") in netns_pids(h["netns"])
        port = _port_open(h["address"])
        healthy &= alive and port
        pid, how = h.get("sshd_pid"), "running" if alive else "gone"
        line = f"{h['name']:<10} {h['address']:<15} {h['netns']:<20} sshd {pid} {how}, port 22 "
        line += "open" if port else "closed"
        click.echo(f"{'✓' if alive and port else '✗'} {line}")
    if not healthy:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
