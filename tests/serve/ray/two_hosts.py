"""Two machines on one Linux box, for tests of what runs on several: each "machine" is a network
namespace (its own interface and IP on a small LAN bridged in the root namespace, loopback up, a
default route) plus its own PID namespace (so `ray stop` there stops that machine's Ray only)
and mount namespace (its own /tmp/ray, Ray's temp dir, and ~/.ray, where Ray keeps its auth
token: each machine's own, as on machines of their own; the rest of the filesystem is shared).

    with TwoHosts(workdir) as lan:  # lan.a (10.77.N.1), lan.b (10.77.N.2); the root: .254
        lan.a.run("ray", "start", "--head", ...)   # a command on machine A, to its end
        server = lan.a.popen("lorafleet", "serve", ...)  # one left running
        httpx.get(f"http://{lan.a.ip}:8000/health")      # the root namespace reaches both

Needs root and iproute2 + util-linux (`ip`, `unshare`, `nsenter`): `require_two_hosts()` fails
the test with the reason when they are missing, or skips it only where LORAFLEET_NO_NETNS=1 is
set (machines without them, on purpose). Names carry this process's pid (lf-hostA-<pid>,
bridge lfbr<pid>), so runs side by side do not collide; one run's leftovers, when its process
died without tearing down, are removed by the next run (`remove_stale`). Each LAN takes the
first 10.77.N.0/24 no interface of the root namespace holds."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SKIP_ENV = "LORAFLEET_NO_NETNS"
NETNS = re.compile(r"^lf-host[AB]-(\d+)$")
LINK = re.compile(r"^lf(?:br|A|B)(\d+)$")
PR_SET_PDEATHSIG = 1
LOCK = "/tmp/lorafleet-two-hosts.lock"
# Each machine's own: Ray's temp dir (its session files and sockets, which two nodes on one
# filesystem would otherwise share) and ~/.ray (the auth token `ray get-auth-token` makes).
PRIVATE = ("/tmp/ray", str(Path.home() / ".ray"))
# A machine's pid 1: reaps every process that ends there, as a machine's init does (`ray stop`
# waits for the processes it kills to be gone, and a zombie never is).
INIT = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


def require_two_hosts() -> None:
    """Fail (skip only when LORAFLEET_NO_NETNS=1) unless namespaces can be made here."""
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    why = None
    if os.geteuid() != 0:
        why = "needs root (network namespaces)"
    elif missing:
        why = f"needs {', '.join(missing)} (iproute2, util-linux)"
    if why is not None:
        unavailable(why)


def unavailable(why: str) -> None:
    """Fail the test saying `why` the machines cannot be made (skip it where SKIP_ENV=1)."""
    message = f"two-machine test {why}; set {SKIP_ENV}=1 to skip it on purpose"
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message)


def sh(*args: str, check: bool = True) -> str:
    """Run a root-namespace command (ip ...), its stdout; a failure names the command."""
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces and links of runs whose process is gone (killed before its
    teardown), with every process still in those namespaces; the names removed."""
    removed = []
    for line in sh("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        found = NETNS.match(name)
        if found is None or alive(int(found.group(1))):
            continue
        for pid in sh("ip", "netns", "pids", name, check=False).split():
            with contextlib.suppress(ProcessLookupError):  # an init: its whole PID namespace
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", name, check=False)
        removed.append(name)
    for line in sh("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        found = LINK.match(name)
        if found is not None and not alive(int(found.group(1))):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def free_subnet() -> str:
    """The first 10.77.N (N in 0..254) no root-namespace address uses."""
    used = set(re.findall(r"inet 10\.77\.(\d+)\.", sh("ip", "-4", "-o", "addr", "show")))
    for n in range(255):
        if str(n) not in used:
            return f"10.77.{n}"
    raise RuntimeError("no free 10.77.N.0/24 subnet")


def _die_with_parent() -> None:  # Popen's preexec_fn: SIGKILL when the test process dies
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Machine:
    """One "machine": network namespace `netns` at `ip`, whose PID, mount (and network)
    namespaces are those of the process `init_pid` (pid 1 there: INIT, which reaps); its own
    /tmp/ray is `tmp_ray` here and its own ~/.ray `dot_ray`. `run` / `popen` start a command
    inside it, with this process's
    environment plus `env`, in `cwd` (default: this process's)."""

    netns: str
    ip: str
    tmp_ray: Path
    dot_ray: Path
    holder: subprocess.Popen | None = None
    init_pid: int = 0
    started: list[subprocess.Popen] = field(default_factory=list)

    def command(self, args: tuple[str, ...], cwd: str | Path | None) -> list[str]:
        where = str(cwd or os.getcwd())
        enter = ["nsenter", "-t", str(self.init_pid), "-n", "-p", "-m", f"--wd={where}", "--"]
        return enter + list(args)

    def run(
        self, *args: str, env: dict | None = None, cwd=None, timeout: float = 120, merge=True
    ) -> subprocess.CompletedProcess:
        """Run `args` here to its end (stdout + stderr together as .stdout, unless `merge` is
        False: then apart, .stdout and .stderr)."""
        return subprocess.run(
            self.command(args, cwd),
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            timeout=timeout,
        )

    def popen(self, *args: str, env: dict | None = None, cwd=None, log: Path) -> subprocess.Popen:
        """Start `args` here, its output to the file `log`; stopped at teardown if still up."""
        with open(log, "w") as out:
            proc = subprocess.Popen(
                self.command(args, cwd),
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started.append(proc)
        return proc

    def children(self, proc: subprocess.Popen) -> list[int]:
        """The command `proc` (a `popen`) runs in here: nsenter's child, as this namespace's
        processes are seen from outside it (what to send a signal to; nsenter passes none)."""
        found = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        return [int(pid) for pid in found.read_text().split()] if found.exists() else []

    def pids(self) -> set[int]:
        """Every process in this machine's network namespace (its init and `unshare` too)."""
        return {int(pid) for pid in sh("ip", "netns", "pids", self.netns, check=False).split()}

    def idle_pids(self) -> set[int]:
        """The processes a machine with nothing running holds: its init and its `unshare`."""
        return {self.init_pid, self.holder.pid} if self.holder is not None else set()


class TwoHosts:
    """A LAN of two machines (`a`, `b`: Machine) built on entering and torn down on leaving
    (every process in them killed, namespaces, links and /etc leftovers removed). `workdir`
    holds each machine's /tmp/ray (its Ray logs, kept for a failing test's report) and ~/.ray."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.tag = str(os.getpid())
        self.bridge = f"lfbr{self.tag}"
        self.subnet = ""
        self.a: Machine | None = None
        self.b: Machine | None = None

    @property
    def root_ip(self) -> str:
        return f"{self.subnet}.254"

    def __enter__(self) -> TwoHosts:
        require_two_hosts()
        remove_stale()
        try:
            self._build()
        except RuntimeError as exc:  # ip / unshare refused (no CAP_SYS_ADMIN, no bridge module)
            self.close()
            unavailable(f"could not build its LAN: {exc}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        with open(LOCK, "a") as lock:  # runs side by side: each takes its subnet in turn
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = free_subnet()
            sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for point in PRIVATE:  # the mount points of each machine's own
            Path(point).mkdir(exist_ok=True)
        self.a = self._machine("A", f"{self.subnet}.1")
        self.b = self._machine("B", f"{self.subnet}.2")

    def _machine(self, letter: str, ip: str) -> Machine:
        netns, veth = f"lf-host{letter}-{self.tag}", f"lf{letter}{self.tag}"
        sh("ip", "netns", "add", netns)
        own = self.workdir / f"host{letter}"
        machine = Machine(netns, ip, own / "tmp-ray", own / "dot-ray")
        if letter == "A":
            self.a = machine  # torn down from here on if a later step fails
        else:
            self.b = machine
        # The machine's end is its eth0 (names are per namespace); ours joins the bridge.
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "set", veth, "up")
        for step in (
            ("addr", "add", f"{ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
            ("link", "set", "lo", "up"),
            # A route out, as a machine has: what Ray's own node-IP guess needs.
            ("route", "add", "default", "via", self.root_ip),
        ):
            sh("ip", "-n", netns, *step)
        machine.tmp_ray.mkdir(parents=True, exist_ok=True)
        machine.dot_ray.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / f"host{letter}.ready"
        script = (
            f'mount --bind "$1" {PRIVATE[0]} && mount --bind "$2" {PRIVATE[1]} && touch "$3" '
            '&& exec "$4" -I -S -c "$5"'
        )
        machine.holder = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc"]
            + ["--kill-child", "sh", "-c", script, "sh", str(machine.tmp_ray)]
            + [str(machine.dot_ray), str(ready), sys.executable, INIT],
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 10
        while not ready.exists():
            if machine.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"machine {netns} did not start (exit {machine.holder.poll()})")
            time.sleep(0.02)
        children = Path(f"/proc/{machine.holder.pid}/task/{machine.holder.pid}/children")
        machine.init_pid = int(children.read_text().split()[0])
        return machine

    def close(self) -> None:
        for machine in (self.a, self.b):
            if machine is None:
                continue
            for proc in machine.started:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            if machine.holder is not None and machine.holder.poll() is None:
                machine.holder.kill()  # unshare --kill-child: its PID namespace goes with it
                machine.holder.wait(10)
            for pid in machine.pids():  # anything left in the network namespace
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            sh("ip", "netns", "del", machine.netns, check=False)
        for name in (self.bridge, f"lfA{self.tag}", f"lfB{self.tag}"):
            sh("ip", "link", "del", name, check=False)
        self.a = self.b = None
