"""The README's two-machine recipe ("Two machines, step by step"), its commands read from the
README and run as written on two machines made of Linux namespaces (two_hosts.TwoHosts; root
needed, see there) with this LAN's IPs, temporary paths and the tiny model: Ray's auth token
made on A and given to B, `ray start --head` on A, `ray start --address` on B, `ray status`
until both nodes are in, `lorafleet serve --ray --replicas 2 --max-replicas-per-node 1` on A
over one shared adapters directory; then, from outside both machines over the LAN: one replica
on each machine (/metrics' `node` label), greedy answers equal to the single-process server's,
an adapter uploaded through admin on A served by B's replica too (read from the shared
directory), and Ctrl-C + `ray stop` on each machine leaving nothing running."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")  # `make install` installs Ray: this skip is for a bare checkout
pytest.importorskip("ray.serve")

from helpers import write_random_lora  # noqa: E402
from two_hosts import TwoHosts, require_two_hosts, sh  # noqa: E402

from lorafleet.models import load_base  # noqa: E402
from lorafleet.serve.api import AuthConfig, ServerConfig  # noqa: E402
from lorafleet.serve.api.config import EngineSettings  # noqa: E402
from lorafleet.serve.api.server import ServerThread, build_state  # noqa: E402

ADMIN, KEY = "admin-key-2h", "tenant-key-2h"
README = Path(__file__).resolve().parents[3] / "README.md"
RECIPE = "### Two machines, step by step"
# What the test changes in the README's commands: its LAN's IPs and paths, the tiny model, and
# for `serve` one thread per replica (2 cores here) and a batch of 2, so that a burst of one
# adapter's requests spills over to the replica that does not hold it yet (Ray routes by
# adapter until the replicas holding it are full).
# float32 on both sides: the burst's answers are compared with the single server's, and
# bfloat16's (`auto` on a CPU with native bfloat16) depend on how rows share a batch; the
# replicas still resolve --quantize auto for their own CPU (tests/serve/api covers `auto`).
SERVE_EXTRA = ["--threads", "1", "--max-batch-size", "2", "--dtype", "float32"]
# ... and how long Ray's router waits for a replica holding the adapter before it sends the
# request to another (default 1-2 s): short, so the spill-over does not hang on how fast
# this machine decodes.
SERVE_ENV = {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "0.1"}
TOKEN = "TOKEN-PRINTED-ON-A"  # where the README's step 0 puts what `ray get-auth-token` printed
# The recipe's steps: (machine, the command's first two words).
STEPS = [
    ("A", "ray get-auth-token"),
    ("A", "export RAY_AUTH_MODE=token"),
    ("B", "export RAY_AUTH_MODE=token"),
    ("A", "ray start"),
    ("B", "ray start"),
    ("A", "ray status"),
    ("A", "lorafleet serve"),
    ("B", "ray stop"),
    ("A", "ray stop"),
]
ACTIVE = re.compile(r"^\s*1 node_[0-9a-f]+", re.M)  # a node under `ray status`'s "Active:"
SETTINGS = EngineSettings(max_batch_size=2)  # the CLI's defaults otherwise
PROMPTS = ["Once upon a time", "The capital of France is"]
BURST, BURST_TOKENS = 6, 300


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The shared adapters dir (alpha, beta), delta to upload later, the same three in ref/
    for the single-process server, and auth.json."""
    require_two_hosts()  # before anything costly: fail (or skip on purpose) with the reason
    root = tmp_path_factory.mktemp("two-hosts")
    base = load_base("tiny", device="cpu")
    for seed, name in enumerate(["alpha", "beta", "delta"]):
        write_random_lora(base, root / "ref" / name, 500 + seed, targets=("q_proj", "v_proj"))
    for name in ("alpha", "beta"):
        shutil.copytree(root / "ref" / name, root / "adapters" / name)
    shutil.copytree(root / "ref" / "delta", root / "upload" / "delta")
    auth = {"admin_keys": [ADMIN], "tenants": {"t": {"keys": [KEY]}}}
    (root / "auth.json").write_text(json.dumps(auth))
    return root


@pytest.fixture(scope="module")
def single(shared):
    """The single-process server over the same base and adapters: the answers to match."""
    state = build_state(
        load_base("tiny", dtype="float32", device="cpu"),
        shared / "ref",
        AuthConfig.load(shared / "auth.json"),
        SETTINGS,
        ServerConfig(model_name="tiny", engine_threads=1),
    )
    with ServerThread(state) as srv:
        yield srv


def readme_recipe() -> list[tuple[str, str]]:
    """The README's two-machine commands in order: (machine "A" | "B", the command line), from
    the first bash block of its "Two machines, step by step" section (`A$ ...`, `B$ ...`)."""
    section = README.read_text().split(RECIPE, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    found = re.findall(r"^([AB])\$ (.*)$", block, re.M)
    return [(machine, " ".join(line.split())) for machine, line in found]


def localize(command: str, lan: TwoHosts, shared: Path) -> list[str]:
    """A README command as this test runs it (its IPs, paths and the tiny model), as argv."""
    for was, now in (
        ("10.0.0.1", lan.a.ip),
        ("10.0.0.2", lan.b.ip),
        ("--base default", "--base tiny"),
        ("/shared/adapters", str(shared / "adapters")),
        ("auth.json", str(shared / "auth.json")),
    ):
        command = command.replace(was, now)
    argv = command.split()
    return argv + SERVE_EXTRA if argv[:2] == ["lorafleet", "serve"] else argv


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, **extra) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", json={**body, **extra}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def replica_requests(url: str) -> dict[str, float]:
    """Requests each replica got so far, by the IP of its node (/metrics' per-replica series)."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    found: dict[str, float] = {}
    for labels, value in re.findall(
        r"^lorafleet_replica_requests_total\{(.*)\} (\S+)$", text, re.M
    ):
        node = re.search(r'node="([^"]*)"', labels).group(1)
        found[node] = found.get(node, 0.0) + float(value)
    return found


def settled(read, done, timeout_s: float = 10.0):
    """read() once done(value) holds (replicas post their stats every half second)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        value = read()
    return value


def burst(url: str, model: str) -> list[str]:
    """BURST concurrent greedy requests for `model` (BURST_TOKENS each), their answers."""
    out: list[str | None] = [None] * BURST

    def one(i: int) -> None:
        out[i] = complete(url, model, "Tell me a story", BURST_TOKENS, ignore_eos=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    return "\n".join(text.splitlines()[-lines:])


def ray_logs(tmp_ray: Path) -> str:
    """The tail of a machine's Ray logs that say why a node or a replica failed."""
    logs = tmp_ray / "session_latest" / "logs"
    parts = [f"--- {p.name}\n{tail(p, 15)}" for p in sorted(logs.glob("raylet.*"))]
    parts += [f"--- {p.name}\n{tail(p, 15)}" for p in sorted(logs.glob("serve/*.log"))[:4]]
    return "\n".join(parts)


def wait_up(url: str, server, why) -> None:
    """Until `url`/health answers (the fleet is up); a failure with the logs if it exits."""
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, f"lorafleet serve exited {server.returncode}{why()}"
        assert time.monotonic() < deadline, f"lorafleet serve not up in 240 s{why()}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def check_fleet(url: str, lan: TwoHosts, shared: Path, single, why, mark) -> None:
    """From outside both machines: one replica on each, the single-process server's answers,
    and an adapter uploaded on A served by both replicas (B's reads the shared directory)."""
    a, b = lan.a, lan.b
    nodes = settled(lambda: replica_requests(url), lambda found: len(found) == 2)
    assert set(nodes) == {a.ip, b.ip}, f"replicas by node: {nodes}{why()}"
    for model in ("alpha", "beta", "tiny"):  # two adapters and the base
        for prompt in PROMPTS:
            assert complete(url, model, prompt) == complete(single.url, model, prompt)
    mark("answers")
    # Uploaded through A into the shared directory; a burst of its requests fills the replica
    # Ray routed it to and spills over to the other.
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = {f: (f, (shared / "upload" / "delta" / f).read_bytes()) for f in names}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(
        url + "/admin/adapters", data={"name": "delta"}, files=files, headers=headers, timeout=60
    )
    assert r.status_code == 201, r.text
    assert (shared / "adapters" / "delta" / "adapter_model.safetensors").is_file()
    asked = 3 * len(PROMPTS)  # the requests so far, counted before the burst
    before = settled(lambda: replica_requests(url), lambda found: sum(found.values()) >= asked)
    answers = burst(url, "delta")
    reference = complete(single.url, "delta", "Tell me a story", BURST_TOKENS, ignore_eos=True)
    assert answers == [reference] * BURST
    after = settled(
        lambda: replica_requests(url),
        lambda found: sum(found.values()) - sum(before.values()) >= BURST,
    )
    served = {node: after.get(node, 0) - before.get(node, 0) for node in (a.ip, b.ip)}
    assert sum(served.values()) >= BURST, served
    assert served[b.ip] > 0 and served[a.ip] > 0, f"delta's requests by node: {served}"
    mark("upload + burst")


def test_the_readme_recipe_serves_one_adapter_directory_from_two_machines(shared, single, tmp_path):
    recipe = readme_recipe()
    assert [(m, " ".join(c.split()[:2])) for m, c in recipe] == STEPS, recipe
    took: dict[str, float] = {}
    start = time.monotonic()

    def mark(step: str) -> None:
        took[step] = round(time.monotonic() - start - sum(took.values()), 1)

    serve_log = tmp_path / "serve.log"
    with TwoHosts(tmp_path) as lan:
        a, b = lan.a, lan.b
        url = f"http://{a.ip}:8000"
        machines = {"A": a, "B": b}
        # Each machine's shell: lorafleet and ray on PATH (this venv's), then its exports.
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        env = {"A": {"PATH": path}, "B": {"PATH": path}}
        token = ""

        def why() -> str:
            return (
                f"\n--- lorafleet serve (A)\n{tail(serve_log)}\n--- Ray on A\n"
                f"{ray_logs(a.tmp_ray)}\n--- Ray on B\n{ray_logs(b.tmp_ray)}"
            )

        try:
            for name, command in recipe:
                machine = machines[name]
                argv = localize(command.replace(TOKEN, token), lan, shared)
                if argv[0] == "export":  # this machine's shell keeps it for what follows
                    env[name].update(arg.split("=", 1) for arg in argv[1:])
                elif argv[:2] == ["ray", "get-auth-token"]:
                    r = machine.run(*argv, env=env[name], merge=False)
                    assert r.returncode == 0, r.stderr
                    token = r.stdout.strip()
                    assert token, r.stderr
                elif argv[:2] == ["ray", "start"]:
                    r = machine.run(*argv, env=env[name])
                    assert r.returncode == 0, r.stdout
                    mark(f"ray start {name}")
                elif argv[:2] == ["ray", "status"]:  # both nodes in: two under "Active:"
                    status = settled(
                        lambda m=machine, n=name, v=argv: m.run(*v, env=env[n]).stdout,
                        lambda out: len(ACTIVE.findall(out)) == 2,
                        timeout_s=30,
                    )
                    assert len(ACTIVE.findall(status)) == 2, status
                    mark("ray status")
                elif argv[:2] == ["lorafleet", "serve"]:
                    server = machine.popen(*argv, env={**env[name], **SERVE_ENV}, log=serve_log)
                    wait_up(url, server, why)
                    mark("lorafleet serve --ray up")
                    check_fleet(url, lan, shared, single, why, mark)
                    for pid in machine.children(server):  # Ctrl-C
                        os.kill(pid, signal.SIGINT)
                    assert server.wait(60) == 0, tail(serve_log)
                    mark("Ctrl-C")
                else:
                    assert argv[:2] == ["ray", "stop"], argv
                    r = machine.run(*argv, env=env[name])
                    assert r.returncode == 0, r.stdout
                    idle = machine.idle_pids()  # nothing left on that machine
                    left = settled(machine.pids, lambda pids, idle=idle: pids == idle)
                    assert left == idle, f"still running on {machine.netns}: {left}"
                    mark(f"ray stop {name}")
        except BaseException:
            print(why())
            raise
        finally:
            print(f"two machines, seconds per step: {took}")


def test_each_machine_is_its_own_and_a_crashed_runs_leftovers_are_removed(tmp_path):
    """The harness itself: a run killed before its teardown leaves namespaces and links,
    which the next run removes; each machine has its own processes and /tmp/ray."""
    require_two_hosts()
    here = str(Path(__file__).resolve().parent)
    crashed = (
        f"import os, sys; sys.path.insert(0, {here!r}); from two_hosts import TwoHosts; "
        f"lan = TwoHosts({str(tmp_path / 'crashed')!r}).__enter__(); "
        "print(lan.a.netns, lan.b.netns, lan.bridge, flush=True); os._exit(1)"
    )
    done = subprocess.run([sys.executable, "-c", crashed], capture_output=True, text=True)
    left = done.stdout.split()
    assert len(left) == 3, done.stderr
    assert set(left[:2]) <= set(sh("ip", "netns", "list").split())  # left behind
    with TwoHosts(tmp_path / "next") as lan:  # removed by the next run
        assert not set(left[:2]) & set(sh("ip", "netns", "list").split())
        assert f" {left[2]}:" not in sh("ip", "-o", "link", "show")
        for machine in (lan.a, lan.b):
            r = machine.run("sh", "-c", f"touch /tmp/ray/{machine.netns} && ps -e -o pid=")
            assert r.returncode == 0, r.stdout
            assert r.stdout.split()[0] == "1"  # its own PID namespace: its init is pid 1
        assert [p.name for p in lan.a.tmp_ray.iterdir()] == [lan.a.netns]
        assert [p.name for p in lan.b.tmp_ray.iterdir()] == [lan.b.netns]
        r = lan.a.run(
            sys.executable, "-c", f"import socket; socket.create_connection(('{lan.b.ip}', 9), 2)"
        )
        assert "Connection refused" in r.stdout  # B answers A (nothing listens on port 9)
