"""`make bench`: the gateway measured side by side with nginx and the upstream, in one run.

DESIGN.md, data plane rule 7: performance is a ratio measured in one run. Three targets serve
the same tiny JSON answer from one nginx upstream:

  direct   the upstream nginx itself (`return 200 '{"ok":true}'`, 1 worker)
  nginx    an nginx `proxy_pass` reverse proxy to it (upstream keep-alive, 1 worker)
  gateway  the data plane (gunicorn, 1 worker, embedded SQLite defaults), with an API key on a
           plan without limits; the demo API routed to the upstream

The servers under test (nginx proxy, gateway) are pinned to core 0; the upstream and the load
generator to core 1. Throughput: wrk, closed loop, one run per target per round, the order
rotated every round, medians over the rounds. Added latency: an open-loop client at fixed
request rates (bench/openloop.py; wrk2 is used instead when installed), upstream direct vs
through the gateway (and nginx for scale).

Everything runs from a temporary directory (database, spool, configs, logs) that is removed at
the end; every process started is stopped, also on Ctrl-C. Writes bench/results/latest.md.

    .venv/bin/python bench/run.py [--rounds 3] [--duration 10] [--rates 500,1500]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchutil import free_port, percentile  # noqa: E402 - bench/ is on sys.path

OPENLOOP_MAX_RPS = 15_000  # what bench/openloop.py was seen to hold on one core

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
PATH = "/demo/anything"
OTHER_CPU_LIMIT = 5  # % of one core used by processes outside the bench: above it, warn
# The upstream's answer: 1 KB of JSON, as a typical small API response.
BODY = b'{"ok":true,"pad":"' + b"x" * (1024 - 20) + b'"}'
assert len(BODY) == 1024
# Variables that would move the gateway off its embedded defaults (or to another database).
SCRUBBED_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "API_KEY_HMAC_SECRET",
    "DJANGO_SETTINGS_MODULE",
)


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes ------------------------------------------------------------------------------
class Procs:
    """Every child in its own process group, registered so that one `stop_all` ends them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None, capture=False
    ) -> subprocess.Popen:
        # A log file per name; the child keeps its own descriptor, ours is closed below.
        out = subprocess.PIPE if capture else open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE if capture else subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if not capture:
                out.close()
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen, timeout: float = 20) -> None:
        """SIGTERM to the group leader (gunicorn and nginx stop their workers), then SIGKILL
        whatever is left of the group."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} ignored SIGTERM for {timeout:.0f} s: SIGKILL")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of our own group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def process_cpu() -> dict[int, tuple[int, int]]:
    """pid -> (process group, user + system CPU jiffies) of every live process (/proc)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
        out[int(entry.name)] = (int(fields[2]), int(fields[11]) + int(fields[12]))
    return out


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat; busy excludes idle and iowait."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in values]
                total = sum(v[:8])  # guest time is already inside user time
                out[int(name[3:])] = (total - v[3] - v[4], total)
    return out


def core_busy(before: dict, after: dict, core: int) -> float:
    busy = after[core][0] - before[core][0]
    total = after[core][1] - before[core][1]
    return busy / total * 100 if total > 0 else 0.0


@dataclass
class Usage:
    wall_s: float
    target_cpu_s: float  # the target server's process group
    other_cpu_s: float  # every process that is not part of the bench
    server_core_busy: float  # % of that core's time
    load_core_busy: float


class Meter:
    """CPU accounting around one run: the target's, the cores', and everyone else's."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, cores: tuple[int, int], target_pgid: int, bench_pgids: set[int]) -> None:
        self.cores = cores
        self.target_pgid = target_pgid
        # Our own processes: the servers, this script (the load generator is a child that has
        # exited and been reaped by the time the run ends, so it is in neither snapshot).
        self.ours = bench_pgids | {os.getpgrp()}
        self.procs0 = process_cpu()
        self.cpu0 = cpu_times()
        self.t0 = time.monotonic()

    def stop(self) -> Usage:
        wall = time.monotonic() - self.t0
        cpu1 = cpu_times()
        procs1 = process_cpu()
        target = other = 0
        for pid, (pgrp, jiffies) in procs1.items():
            before = self.procs0.get(pid)
            delta = jiffies - (before[1] if before and before[0] == pgrp else 0)
            if pgrp == self.target_pgid:
                target += delta
            elif pgrp not in self.ours:
                other += delta
        return Usage(
            wall_s=wall,
            target_cpu_s=target / self.TICK,
            other_cpu_s=other / self.TICK,
            server_core_busy=core_busy(self.cpu0, cpu1, self.cores[0]),
            load_core_busy=core_busy(self.cpu0, cpu1, self.cores[1]),
        )


def wait_quiet(cores: tuple[int, int], timeout: float) -> float:
    """Wait (up to `timeout` s) until processes outside the bench use at most OTHER_CPU_LIMIT %
    of a core over one second; return the last measurement."""
    deadline = time.monotonic() + timeout
    while True:
        meter = Meter(cores, -1, set())
        time.sleep(1)
        u = meter.stop()
        other = u.other_cpu_s / u.wall_s * 100
        if other <= OTHER_CPU_LIMIT:
            return other
        if time.monotonic() >= deadline:
            log(f"WARNING: other processes use {other:.0f}% of a core: the numbers will suffer")
            return other
        log(f"other processes use {other:.0f}% of a core; waiting for a quiet machine")
        time.sleep(4)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(
    procs: Procs,
    proc: subprocess.Popen,
    name: str,
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> None:
    """Poll until `url` answers 200 with the upstream's body; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited ({proc.returncode}):\n{procs.log_tail(name)}")
        try:
            status, body = http_get(url, headers)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200 and body == BODY:
                return
            last = f"{status} {body[:300]!r}"
        time.sleep(0.1)
    raise BenchError(f"{name} not ready in {timeout:.0f} s ({last}):\n{procs.log_tail(name)}")


# --- tools ----------------------------------------------------------------------------------
def which(cmd: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(cmd, path=path)


def ensure_tools(also: tuple[str, ...] = ()) -> dict[str, str]:
    """Paths of nginx, wrk, taskset (and wrk2 if present) and of the commands `also` names,
    each a Debian package of the same name: installed when missing and we are root."""
    missing = [p for p in ("nginx", "wrk", *also) if which(p) is None]
    if missing:
        if os.geteuid() != 0:
            raise BenchError(f"missing {', '.join(missing)}: apt-get install -y nginx wrk (root)")
        log(f"installing {' '.join(missing)} (Debian packages)")
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=apt_env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *missing], check=True, env=apt_env, timeout=600
        )
    tools = {}
    for name in ("nginx", "wrk", "taskset", *also):
        path = which(name)
        if path is None:
            raise BenchError(f"{name} not found")
        tools[name] = path
    wrk2 = which("wrk2")
    if wrk2:
        tools["wrk2"] = wrk2
    return tools


def pick_cores() -> tuple[int, int]:
    """(server core, load core): the first two CPUs this process may run on."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise BenchError("the bench needs 2 CPUs: servers on one, the load generator on another")
    return cores[0], cores[1]


# --- nginx ----------------------------------------------------------------------------------
NGINX_MAIN = """\
worker_processes 1;
daemon off;
master_process on;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
@SERVER@
}
"""
UPSTREAM_SERVER = """\
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            default_type application/json;
            return 200 '@BODY@';
        }
    }"""
PROXY_SERVER = """\
    upstream bench_upstream {
        server 127.0.0.1:@UPSTREAM_PORT@;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:@PORT@;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }"""


def chain_servers(ports: list[int], upstream_port: int) -> str:
    """nginx proxy_pass through len(ports) hops inside one worker: ports[0] proxies to
    ports[1], ..., the last to the upstream, each hop over keep-alive connections. Each hop
    costs the worker another proxy's CPU, so a few of them make a C proxy that spends about
    what the gateway spends per request, with the same two cross-core hops (client -> server
    core -> upstream and back): a control for latency at the same share of one core."""
    blocks = []
    for i, port in enumerate(ports):
        nxt = ports[i + 1] if i + 1 < len(ports) else upstream_port
        blocks.append(
            fill(PROXY_SERVER.replace("bench_upstream", f"hop{i}"), port=port, upstream_port=nxt)
        )
    return "\n".join(blocks)


def fill(template: str, **values: int | str) -> str:
    """The template with each @NAME@ replaced by values[name]."""
    for key, value in values.items():
        template = template.replace(f"@{key.upper()}@", str(value))
    return template


def nginx_conf(directory: Path, server: str, **values: int | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = NGINX_MAIN.replace("@SERVER@", fill(server, **values)).replace("@DIR@", str(directory))
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


def start_nginx(
    procs: Procs, tools: dict, name: str, directory: Path, conf: Path, core: int
) -> subprocess.Popen:
    args = [tools["nginx"], "-p", str(directory), "-e", str(directory / "error.log")]
    check = subprocess.run(
        [*args, "-c", str(conf), "-t", "-q"], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise BenchError(f"nginx config {conf} rejected:\n{check.stderr}")
    return procs.start(name, [tools["taskset"], "-c", str(core), *args, "-c", str(conf)])


# --- the gateway and its database -----------------------------------------------------------
# The full pipeline checks a rate limit and a quota on every request (never reached); the
# bare API is the same upstream behind an anonymous route: no credential, no limits. The
# "policies" API carries every payload policy (CORS, transformations, validation, a cache,
# WebSocket), so that the full pipeline runs with them configured on routes it does not
# match; its /policies/cached route is the cache-hit target (the same URL: every request
# after the first is a hit).
BENCH_PLAN = """\
from django.db import transaction
from gateway.config import config_bump
from gateway.models import Api, Policy, Route
from portal.models import Plan, RateLimit
OPENAPI = (
    "openapi: 3.0.3\\ninfo: {title: t, version: '1'}\\n"
    "paths: {/anything: {get: {responses: {'200': {description: ok}}}}}"
)
with transaction.atomic():
    plan, _ = Plan.objects.get_or_create(
        slug="bench", defaults={"name": "Bench", "quota_limit": 2**31 - 1}
    )
    RateLimit.objects.get_or_create(plan=plan, defaults={"limit": 10**9, "window": "minute"})
    demo = Api.objects.get(slug="demo")
    plan.apis.add(demo)
    bare = Api.objects.create(name="Bare", slug="bare", path_prefix="/bare", upstream=demo.upstream)
    Route.objects.create(api=bare, name="all", path="/", anonymous=True)
    policies = Api.objects.create(
        name="Policies", slug="policies", path_prefix="/policies", upstream=demo.upstream,
        openapi=OPENAPI,
    )
    plan.apis.add(policies)
    everything = Route.objects.create(api=policies, name="all", path="/")
    cached = Route.objects.create(api=policies, name="cached", path="/cached")
    Policy.objects.create(api=policies, kind="cors", config={"origins": ["https://a.test"]})
    Policy.objects.create(api=policies, kind="request_transform",
                          config={"headers": {"add": {"X-A": "1"}}, "json": {"remove": ["p"]}})
    Policy.objects.create(api=policies, kind="response_transform",
                          config={"headers": {"remove": ["X-B"]}})
    Policy.objects.create(route=everything, kind="validate", config={"response": "report"})
    Policy.objects.create(route=everything, kind="websocket", config={})
    Policy.objects.create(route=cached, kind="cache", config={"ttl": 3600})
    config_bump(reason="bench")
"""


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BenchError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def prepare_database(env: dict[str, str], upstream_port: int, *, policies: bool = True) -> str:
    """Migrate a fresh SQLite database, seed the demo, add a plan without limits; the key."""
    manage(env, "migrate", "--noinput", "-v0")
    manage(env, "seeddemo", "--upstream-port", str(upstream_port))
    plan = BENCH_PLAN
    if not policies:  # --without-policies: the same, minus the policies API
        plan = (
            plan[: plan.index("    policies = Api.objects.create(")]
            + '    config_bump(reason="bench")\n'
        )
    manage(env, "shell", "-c", plan)
    out = manage(env, "createapikey", "--email", "bench@example.com", "--plan", "bench")
    key = out.strip().splitlines()[-1].strip() if out.strip() else ""
    if not key or " " in key:
        raise BenchError(f"createapikey printed no key: {out!r}")
    return key


# --- wrk ------------------------------------------------------------------------------------
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_duration_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    target: str
    round: int
    rps: float
    requests: int
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    usage: Usage | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


def parse_wrk(output: str, target: str, rnd: int) -> WrkResult:
    def need(pattern: str) -> re.Match:
        m = re.search(pattern, output, re.MULTILINE)
        if not m:
            raise BenchError(f"could not parse wrk output ({pattern}):\n{output}")
        return m

    pct = {
        int(m.group(1)): parse_duration_ms(m.group(2))
        for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE)
    }
    if set(pct) != {50, 75, 90, 99}:
        raise BenchError(f"no latency distribution in wrk output:\n{output}")
    result = WrkResult(
        target=target,
        round=rnd,
        rps=float(need(r"^Requests/sec:\s+([\d.]+)").group(1)),
        requests=int(need(r"^\s+(\d+) requests in").group(1)),
        p50_ms=pct[50],
        p75_ms=pct[75],
        p90_ms=pct[90],
        p99_ms=pct[99],
    )
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        result.non_2xx_3xx = int(m.group(1))
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        names = ("connect", "read", "write", "timeout")
        result.socket_errors = {n: int(v) for n, v in zip(names, m.groups(), strict=True)}
    return result


@dataclass
class Target:
    name: str
    url: str
    headers: list[str]
    server: subprocess.Popen  # whose process group's CPU is charged to this target
    describe: str
    client_core: int | None = None  # where the load generator runs (default: the load core)
    fixed_only: bool = False  # a control of the fixed-rate phase only, not run under wrk


def wrk_command(
    tools: dict, cores: str, connections: int, duration: float, url: str, headers: list[str]
) -> list[str]:
    """wrk, one thread pinned to `cores` (taskset's list syntax), closed loop on `url`."""
    cmd = [tools["taskset"], "-c", cores, tools["wrk"], "-t1", f"-c{connections}"]
    cmd += [f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    return cmd


class Runner:
    def __init__(
        self, procs: Procs, tools: dict, cores: tuple[int, int], servers: set[int], args
    ) -> None:
        self.procs = procs
        self.tools = tools
        self.cores = cores
        self.load_core = cores[1]
        self.servers = servers  # process groups of the bench's own servers
        self.args = args
        self.sent_to_gateway = 0  # requests that wrk completed against the gateway

    def wrk(self, target: Target, duration: float, rnd: int) -> WrkResult:
        cmd = wrk_command(
            self.tools,
            str(self.load_core),
            self.args.connections,
            duration,
            target.url,
            target.headers,
        )
        out, usage = self._run_client("wrk", cmd, target, timeout=duration + 30)
        result = parse_wrk(out, target.name, rnd)
        result.usage = usage
        if target.name.startswith("gateway"):
            self.sent_to_gateway += result.requests
        return result

    def _run_client(self, name: str, cmd: list[str], target: Target, *, timeout: float):
        """Run a load client against `target`, metering CPU; (its stdout, the usage)."""
        meter = Meter(self.cores, target.server.pid, self.servers)
        proc = self.procs.start(name, cmd, capture=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{name} against {target.name} did not finish") from None
        finally:
            self.procs.stop(proc)
        usage = meter.stop()
        if proc.returncode != 0:
            tail = err.decode(errors="replace")[-2000:]
            raise BenchError(f"{name} failed ({proc.returncode}): {tail}")
        return out.decode(errors="replace"), usage

    def fixed_rate(self, target: Target, rate: float, duration: float) -> dict:
        """Open loop at `rate` rps; wrk2 when installed, else bench/openloop.py."""
        core = self.load_core if target.client_core is None else target.client_core
        taskset = [self.tools["taskset"], "-c", str(core)]
        if "wrk2" in self.tools:
            cmd = [*taskset, self.tools["wrk2"], "-t1", f"-c{self.args.connections}"]
            cmd += [f"-d{duration:g}s", f"-R{rate:g}", "--latency"]
            for h in target.headers:
                cmd += ["-H", h]
            cmd.append(target.url)
        else:
            cmd = [*taskset, sys.executable, str(BENCH / "openloop.py"), "--url", target.url]
            cmd += ["--rate", f"{rate:g}", "--duration", f"{duration:g}"]
            for h in target.headers:
                cmd += ["--header", h]
        text, usage = self._run_client("fixed-rate", cmd, target, timeout=duration + 60)
        if "wrk2" in self.tools:
            w = parse_wrk(text, target.name, 0)
            res = {
                "tool": "wrk2",
                "sent": w.requests,
                "completed": w.requests,
                "achieved_send_rps": w.rps,
                "statuses": {},
                "errors": {"non_2xx_3xx": w.non_2xx_3xx, **w.socket_errors},
                "latency_ms": {"p50": w.p50_ms, "p90": w.p90_ms, "p99": w.p99_ms, "max": None},
                "send_lag_ms": {},
            }
        else:
            res = json.loads(text)
            res["tool"] = "openloop.py"
        res["target"] = target.name
        res["usage"] = usage.__dict__
        if target.name.startswith("gateway"):
            self.sent_to_gateway += res["completed"] + min(50, res["sent"])  # + its warm-up
        return res


# --- report ---------------------------------------------------------------------------------
def version_of(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0] if text else "?"


# Linux guests on KVM idle in the haltpoll cpuidle driver: an idle vCPU polls for up to this
# many ns before it halts (Linux's default is 200,000). Waking a halted vCPU costs the waker
# an IPI, a VM exit, and the woken side the host's scheduling delay; a polling one is woken by
# a flag. Some VM images set 0 (these did: every wake-up of the idle load core cost the
# gateway's core a VM exit).
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")


def halt_poll_ns() -> str:
    """The guest's halt-polling limit in ns, or "n/a" (not a KVM guest with haltpoll)."""
    try:
        return HALT_POLL.read_text().strip()
    except OSError:
        return "n/a"


@contextlib.contextmanager
def guest_halt_poll(ns: int | None):
    """Run with the guest's halt-polling limit set to `ns` (None: as the machine has it),
    restored afterwards, even on Ctrl-C."""
    if ns is None:
        yield
        return
    try:
        before = HALT_POLL.read_text().strip()
        HALT_POLL.write_text(str(ns))
    except OSError as exc:
        raise BenchError(
            f"--guest-halt-poll-ns: cannot set {HALT_POLL} ({exc}); needs root "
            "on a KVM guest with the haltpoll cpuidle driver"
        ) from exc
    log(f"guest halt polling {before} -> {ns} ns for this run")
    try:
        yield
    finally:
        HALT_POLL.write_text(before)
        log(f"guest halt polling restored to {before} ns")


def machine_info(tools: dict) -> dict:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = {}
    for dist in ("gunicorn", "uvicorn", "uvicorn-worker", "uvloop", "httptools", "aiohttp"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = "not installed"
    packages["Django"] = metadata.version("Django")
    commit = version_of(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "halt_poll_ns": halt_poll_ns(),
        "python": platform.python_version(),
        "nginx": version_of([tools["nginx"], "-v"]).removeprefix("nginx version: nginx/"),
        "wrk": version_of([tools["wrk"], "-v"]).split(" Copyright")[0].removeprefix("wrk "),
        "wrk2": version_of([tools["wrk2"], "-v"]) if "wrk2" in tools else "not installed",
        "packages": packages,
        "commit": commit + (" + uncommitted changes" if dirty else ""),
    }


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)


def render(
    info: dict,
    args,
    cores: tuple[int, int],
    targets: list[Target],
    runs: list[WrkResult],
    fixed: list[dict],
    checks: list[str],
    runtime_s: float,
) -> str:
    server_core, load_core = cores
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    out = [
        f"# Gateway benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}, "
        f"guest halt polling (guest_halt_poll_ns) {info['halt_poll_ns']}",
        f"- Versions: Python {info['python']}, nginx {info['nginx']}, wrk {info['wrk']}, "
        f"wrk2 {info['wrk2']}; {pk}",
        f"- Project commit: {info['commit']}",
        f"- Pinning: nginx proxy and gateway on core {server_core}; upstream nginx and the "
        f"load generator on core {load_core}. Gateway: gunicorn, 1 worker, embedded defaults "
        "(SQLite, in-process limits, local log spool), plan without rate limit or quota.",
        f"- Total runtime: {runtime_s:.0f} s",
        "",
        f"## Throughput: wrk -t1 -c{args.connections} -d{args.duration:g}s --latency, "
        f"{args.rounds} round(s)",
        "",
        "| target | rps median | p50 | p99 | ratio vs direct | ratio vs nginx |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_target: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
    for r in runs:
        by_target[r.target].append(r)
    direct_rps = median([r.rps for r in by_target["direct"]]) if by_target["direct"] else None
    nginx_rps = median([r.rps for r in by_target["nginx"]]) if by_target["nginx"] else None
    for t in targets:
        rs = by_target[t.name]
        if not rs:
            continue
        rps = median([r.rps for r in rs])
        ratio = f"{rps / direct_rps:.3f}" if direct_rps else "–"
        ratio_nginx = f"{rps / nginx_rps:.3f}" if nginx_rps else "–"
        out.append(
            f"| {t.name} | {rps:,.0f} | {ms(median([r.p50_ms for r in rs]))} | "
            f"{ms(median([r.p99_ms for r in rs]))} | {ratio} | {ratio_nginx} |"
        )
    out += [
        "",
        "Targets: " + "; ".join(f"**{t.name}** = {t.describe}" for t in targets) + ".",
        "",
        "What the numbers are: *rps median* is the median over rounds of wrk's Requests/sec "
        "(closed loop: each of the connections sends its next request when the previous "
        f"answer arrives); *p50*/*p99* are the medians over rounds of wrk's --latency "
        f"percentiles at that saturation load, so they include queueing behind the "
        f"{args.connections} connections, not the latency an unloaded request sees; *ratio vs "
        "direct* / *vs nginx* is rps divided by the direct / nginx rps. The direct upstream "
        "shares its core with wrk, so *direct* (and nginx, which also loads the upstream) is "
        "bounded by that core rather than by nginx alone: see *core busy* below.",
        "",
        "### Every run (order rotated each round)",
        "",
        "| round | target | rps | p50 | p90 | p99 | requests | non-2xx/3xx | socket errors "
        f"| server CPU | server CPU µs/req | core {server_core} busy | core {load_core} busy "
        "| other processes' CPU |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for r in runs:
        sock_s = ", ".join(f"{k} {v}" for k, v in r.socket_errors.items() if v) or "0"
        u = r.usage
        assert u is not None
        util = u.target_cpu_s / u.wall_s * 100 if u.wall_s else 0
        per_req = u.target_cpu_s / r.requests * 1e6 if r.requests else 0
        other = u.other_cpu_s / u.wall_s * 100 if u.wall_s else 0
        out.append(
            f"| {r.round} | {r.target} | {r.rps:,.0f} | {ms(r.p50_ms)} | {ms(r.p90_ms)} | "
            f"{ms(r.p99_ms)} | {r.requests:,} | {r.non_2xx_3xx} | {sock_s} | {util:.0f}% | "
            f"{per_req:.1f} | {u.server_core_busy:.0f}% | {u.load_core_busy:.0f}% | "
            f"{other:.0f}% |"
        )
    out += [
        "",
        "*server CPU* is the user+system CPU time of the target's own processes (upstream "
        "nginx for direct, the proxy nginx for nginx, gunicorn master and worker for gateway) "
        "over the wrk run's wall time (100% = one core saturated); *µs/req* divides that CPU "
        f"time by the requests wrk completed. *core N busy* is that CPU's non-idle time "
        f"(/proc/stat) during the run: core {load_core} carries wrk and the upstream, so when "
        f"it is near 100% the load side, not the target, is the bottleneck (typically for "
        f"direct and nginx; the gateway should saturate core {server_core}). *other "
        "processes' CPU* is the CPU time of every process outside the bench during the run, "
        "in % of one core: it should be near 0; if not, something else was running and the "
        "numbers of that run are not trustworthy.",
    ]
    if fixed:
        tool = fixed[0]["tool"]
        out += [
            "",
            f"## Added latency at fixed request rates (open loop, {tool}, "
            f"{args.fixed_duration:g} s per run)",
            "",
            "Medians over the rounds; *added* is worked out per round against that round's "
            "direct run, then the median taken:",
            "",
            "| rate | target | server CPU | µs/req | p50 | p99 | added p50 | added p99 "
            "| added p99, each round | inside the gateway p50 / p99 | gateway's own p99 |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for rate, name, row in fixed_medians(fixed):
            each = ", ".join(ms(x) for x in row["added_p99"]) or "–"
            inside = own = "–"
            if row["inside_p99"] is not None:
                inside = f"{ms(row['inside_p50'])} / {ms(row['inside_p99'])}"
                own = ms(row["own_p99"])
            out.append(
                f"| {rate:g} | {name} | {row['cpu_pct']:.0f}% | {row['cpu_us_per_req']:.0f} | "
                f"{ms(row['p50'])} | {ms(row['p99'])} | {ms(row['added_p50_median'])} | "
                f"{ms(row['added_p99_median'])} | {each} | {inside} | {own} |"
            )
        out += [
            "",
            "*Server CPU* is the target's CPU time over the run's wall time (100% = its core "
            "saturated) and *µs/req* that CPU time per completed request, medians over the "
            "rounds: at a fixed rate a request costs more than at saturation (wrk's table), "
            "where one wake-up of the server serves many requests; so half the maximum rate "
            "can be well over half of the core.",
            "",
            "*Inside the gateway* is the gateway's own record of the same requests (its log "
            "events: `ms`, from the request's context being made, once the head is parsed, to "
            "the response's last byte handed to the socket), and *own* that minus the time "
            "spent waiting for the upstream (`up_ms`): the pipeline's own work (the event "
            "loop's delays in getting back to a request fall into `up_ms` or outside). "
            "What the client saw beyond *inside* went by outside the worker's Python code: the "
            "loopback hops, and a request waiting in a socket until the worker's core woke "
            "and its loop read it.",
        ]
        out += [
            "",
            "### Every fixed-rate run",
            "",
            "| rate | round | target | achieved rps | server CPU | p50 | p90 | p99 | max "
            "| added p50 | added p99 | inside p50 / p90 / p99 | own p99 | statuses | errors |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | --- | --- |",
        ]
        direct = {(f["rate"], f.get("round", 1)): f for f in fixed if f["target"] == "direct"}
        for f in fixed:
            lat = f["latency_ms"]
            base = direct.get((f["rate"], f.get("round", 1)))
            add50 = add99 = "–"
            if base is not None and f["target"] != "direct":
                add50 = ms(lat["p50"] - base["latency_ms"]["p50"])
                add99 = ms(lat["p99"] - base["latency_ms"]["p99"])
            statuses = ", ".join(f"{k}: {v:,}" for k, v in f["statuses"].items()) or "–"
            errors = ", ".join(f"{k}: {v}" for k, v in f["errors"].items() if v) or "0"
            achieved = f["achieved_send_rps"]
            inside = own = "–"
            if "gateway_ms" in f:
                g = f["gateway_ms"]
                inside = " / ".join(ms(g["total"][q]) for q in ("p50", "p90", "p99"))
                own = ms(g["own"]["p99"])
            cpu = cpu_medians([f])["cpu_pct"]
            out.append(
                f"| {f['rate']:g} | {f.get('round', 1)} | {f['target']} | {achieved:,.0f} | "
                f"{cpu:.0f}% | {ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p99'])} | "
                f"{ms(lat.get('max'))} | {add50} | {add99} | {inside} | {own} | {statuses} "
                f"| {errors} |"
            )
        if tool == "openloop.py":
            lags = ", ".join(
                f"{f['target']}@{f['rate']:g}#{f.get('round', 1)}: {ms(f['send_lag_ms']['p99'])}"
                for f in fixed
            )
            out += [
                "",
                "What the numbers are: bench/openloop.py (Python, asyncio protocols, uvloop, "
                "pinned to the load core) sends request i at t0 + i/rate whatever the earlier "
                "answers do, and "
                "times each request from that intended send time to the end of its body, so "
                "client lag and server queueing both count (no coordinated omission). The "
                "client's own cost (Python; it polls between sends less than 1 ms apart, at "
                "nice 19 so that the upstream sharing its core is not kept waiting) is in "
                "every number, so differences below ~0.1 ms are noise; "
                "*added p50/p99* = the target's percentile minus the direct upstream's at the "
                "same rate, which cancels most of it: that is the latency the hop adds. "
                "Percentiles of a difference are not the difference of percentiles; at p99 "
                "this is an estimate. The client's p99 lateness in sending (already inside "
                f"the latencies above): {lags}.",
            ]
    out += ["", "## Checks", ""]
    out += [f"- {c}" for c in checks]
    return "\n".join(out) + "\n"


def fixed_medians(fixed: list[dict]) -> list[tuple[float, str, dict]]:
    """Per (rate, target): median p50/p99 over rounds, and the added latency against the
    same round's direct run (per round, then the median)."""
    direct = {(f["rate"], f.get("round", 1)): f for f in fixed if f["target"] == "direct"}
    groups: dict[tuple[float, str], list[dict]] = {}
    for f in fixed:
        groups.setdefault((f["rate"], f["target"]), []).append(f)
    rows = []
    for (rate, name), fs in groups.items():
        p50 = [f["latency_ms"]["p50"] for f in fs if f["latency_ms"]["p50"] is not None]
        p99 = [f["latency_ms"]["p99"] for f in fs if f["latency_ms"]["p99"] is not None]
        add50, add99 = [], []
        for f in fs:
            base = direct.get((rate, f.get("round", 1)))
            if name == "direct" or base is None or f["latency_ms"]["p99"] is None:
                continue
            add50.append(f["latency_ms"]["p50"] - base["latency_ms"]["p50"])
            add99.append(f["latency_ms"]["p99"] - base["latency_ms"]["p99"])
        rows.append(
            (
                rate,
                name,
                {
                    "p50": median(p50) if p50 else None,
                    "p99": median(p99) if p99 else None,
                    "added_p50": add50,
                    "added_p99": add99,
                    "added_p50_median": median(add50) if add50 else None,
                    "added_p99_median": median(add99) if add99 else None,
                    **inside_medians(fs),
                    **cpu_medians(fs),
                },
            )
        )
    return rows


def spool_events(spool: Path) -> list[dict]:
    """Every log event the gateway wrote to its spool (finished files only, as ingest reads)."""
    if not spool.is_dir():
        return []
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from gateway.dataplane.logship import decode_batch

    return [
        e for path in sorted(spool.glob("[0-9]*.json")) for e in decode_batch(path.read_bytes())
    ]


def spool_summary(events: list[dict]) -> tuple[int, Counter, Counter]:
    statuses: Counter = Counter(e.get("status") for e in events)
    errors: Counter = Counter(e["err"] for e in events if e.get("err"))
    return len(events), statuses, errors


def cpu_medians(fs: list[dict]) -> dict:
    """Medians over rounds of the target's CPU: % of one core, and µs per completed request."""
    pct, per_req = [], []
    for f in fs:
        u = f.get("usage") or {}
        if u.get("wall_s"):
            pct.append(u["target_cpu_s"] / u["wall_s"] * 100)
        if u and f.get("completed"):
            per_req.append(u["target_cpu_s"] / f["completed"] * 1e6)
    return {
        "cpu_pct": median(pct) if pct else 0.0,
        "cpu_us_per_req": median(per_req) if per_req else 0.0,
    }


def inside_medians(fs: list[dict]) -> dict:
    """Medians over rounds of the gateway's own view (inside_gateway()); None if it has none."""
    views = [f["gateway_ms"] for f in fs if f.get("gateway_ms", {}).get("events")]

    def med(part: str, q: str) -> float | None:
        return median([v[part][q] for v in views]) if views else None

    return {
        "inside_p50": med("total", "p50"),
        "inside_p99": med("total", "p99"),
        "own_p99": med("own", "p99"),
    }


def inside_gateway(spool_events: list[dict], fixed: list[dict]) -> None:
    """Adds to each fixed-rate run against the gateway its latency as the gateway itself
    measured it, from its log events (`ms`: request context made -> response written; `up_ms`:
    the upstream's part): f["gateway_ms"] = {"events", "total": {p50, p90, p99}, "own": ...}.

    Client latency minus this is what the gateway did not see: the network hops, the time a
    request waited in a socket before the worker's event loop read it (and the core woke
    up), and the client's own lateness."""
    runs = [f for f in fixed if f["target"].startswith("gateway") and "window" in f]
    if not runs:
        return
    events = []
    for e in spool_events:
        if isinstance(e.get("t"), int | float) and isinstance(e.get("ms"), int | float):
            up = e.get("up_ms")
            events.append((e["t"], e["ms"], e["ms"] - up if up is not None else e["ms"]))
    events.sort()
    times = [e[0] for e in events]
    for f in runs:
        lo, hi = f["window"]
        chosen = events[bisect.bisect_left(times, lo) : bisect.bisect_right(times, hi)]
        total = sorted(e[1] for e in chosen)
        own = sorted(e[2] for e in chosen)
        f["gateway_ms"] = {
            "events": len(chosen),
            "total": {f"p{q}": percentile(total, q) for q in (50, 90, 99)},
            "own": {f"p{q}": percentile(own, q) for q in (50, 90, 99)},
        }


# --- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="wrk rounds per target (default 3)")
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of wrk per target, unused")
    p.add_argument(
        "--rates",
        default="500,half",
        help="fixed request rates for the added-latency runs, comma separated; 'half' is "
        "half the gateway's measured maximum ('' to skip)",
    )
    p.add_argument("--fixed-duration", type=float, default=10, help="seconds per fixed-rate run")
    p.add_argument(
        "--fixed-rounds",
        type=int,
        default=3,
        help="fixed-rate rounds per target and rate, order rotated; medians (default 3)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30,
        help="seconds to wait for other processes to go idle before starting (default 30)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--without-policies",
        action="store_true",
        help="leave out the API that carries every payload policy (and the cache-hit target), "
        "to compare the full pipeline with and without them configured elsewhere",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated gateway targets to run (gateway-bare, gateway, gateway-cache-hit)"
        "; direct and nginx always run (and nginx-chain unless --chain-hops 0). For a "
        "profile of one path.",
    )
    p.add_argument(
        "--chain-hops",
        type=int,
        default=4,
        help="proxy hops of the nginx-chain target, a C proxy costing about the gateway's CPU "
        "per request (default 4; 0: no such target)",
    )
    p.add_argument(
        "--guest-halt-poll-ns",
        type=int,
        default=None,
        help="set the KVM guest's halt-polling limit for the run and restore it after (root; "
        "Linux's default is 200000, some VM images set 0); default: leave it",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the gateway's event loop and print its top functions (slows it)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be 1..50")
    if not 1 <= args.fixed_rounds <= 20:
        p.error("--fixed-rounds must be 1..20")
    if not 1 <= args.duration <= 600 or not 1 <= args.fixed_duration <= 600:
        p.error("durations must be 1..600 s")
    if not 0 <= args.wait_quiet <= 3600:
        p.error("--wait-quiet must be 0..3600 s")
    if not 1 <= args.connections <= 10_000:
        p.error("--connections must be 1..10000")
    if not 0 <= args.chain_hops <= 32:
        p.error("--chain-hops must be 0..32")
    if args.guest_halt_poll_ns is not None and not 0 <= args.guest_halt_poll_ns <= 10_000_000:
        p.error("--guest-halt-poll-ns must be 0..10000000")
    try:
        items = [r.strip() for r in args.rates.split(",") if r.strip()]
        args.half = "half" in items
        args.rate_list = [float(r) for r in items if r != "half"]
    except ValueError:
        p.error("--rates: numbers separated by commas")
    if any(not 1 <= r <= OPENLOOP_MAX_RPS for r in args.rate_list):
        p.error(f"--rates: 1..{OPENLOOP_MAX_RPS} rps each (what bench/openloop.py can hold)")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="apigw-bench-"))
    procs = Procs(tmp)
    try:
        with guest_halt_poll(args.guest_halt_poll_ns):
            return _bench(args, tmp, procs, started)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _bench(args, tmp: Path, procs: Procs, started: float) -> int:
    tools = ensure_tools()
    server_core, load_core = pick_cores()
    info = machine_info(tools)
    log(f"{info['nproc']} CPUs, {info['cpu_model']}; temporary directory {tmp}")
    preflight = wait_quiet((server_core, load_core), args.wait_quiet)

    upstream_port, proxy_port, gateway_port = free_port(), free_port(), free_port()
    var_dir = tmp / "var"
    var_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env = {k: v for k, v in env.items() if not k.startswith("GATEWAY_")}
    env.update(VAR_DIR=str(var_dir), PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING")

    log("upstream nginx")
    up_dir = tmp / "upstream"
    conf = nginx_conf(up_dir, UPSTREAM_SERVER, port=upstream_port, body=BODY.decode())
    upstream = start_nginx(procs, tools, "upstream", up_dir, conf, load_core)
    log("nginx proxy_pass")
    px_dir = tmp / "proxy"
    conf = nginx_conf(px_dir, PROXY_SERVER, port=proxy_port, upstream_port=upstream_port)
    proxy = start_nginx(procs, tools, "proxy", px_dir, conf, server_core)
    chain = None
    if args.chain_hops:
        log(f"nginx proxy_pass chain, {args.chain_hops} hops")
        chain_ports = [free_port() for _ in range(args.chain_hops)]
        ch_dir = tmp / "chain"
        conf = nginx_conf(ch_dir, chain_servers(chain_ports, upstream_port))
        chain = start_nginx(procs, tools, "chain", ch_dir, conf, server_core)

    log("database: migrate, seeddemo, bench plan, API key")
    key = prepare_database(env, upstream_port, policies=not args.without_policies)
    log("gateway")
    gw_env = {
        **env,
        "GATEWAY_BIND": f"127.0.0.1:{gateway_port}",
        "GATEWAY_OPS_BIND": f"127.0.0.1:{free_port()}",
        "GATEWAY_WORKERS": "1",
    }
    if args.profile:
        gw_env["GATEWAY_PROFILE_FILE"] = str(tmp / "gateway.prof")
    gateway = procs.start(
        "gateway",
        [
            tools["taskset"],
            "-c",
            str(server_core),
            str(BIN / "gunicorn"),
            "-c",
            "gateway/dataplane/gunicorn_conf.py",
        ],
        env=gw_env,
    )
    base = "http://127.0.0.1:{}" + PATH
    wait_http(procs, upstream, "upstream", base.format(upstream_port))
    wait_http(procs, proxy, "proxy", base.format(proxy_port))
    if chain is not None:
        wait_http(procs, chain, "chain", base.format(chain_ports[0]))
    wait_http(procs, gateway, "gateway", base.format(gateway_port), {"X-API-Key": key})
    status, _ = http_get(base.format(gateway_port))
    if status != 401:
        raise BenchError(f"gateway without a key answered {status}, expected 401")

    targets = [
        Target("direct", base.format(upstream_port), [], upstream, "the upstream nginx"),
        Target("nginx", base.format(proxy_port), [], proxy, "nginx proxy_pass, keep-alive 64"),
        Target(
            "gateway-bare",
            f"http://127.0.0.1:{gateway_port}/bare/anything",
            [],
            gateway,
            "the gateway as a bare proxy (an anonymous route: routing, proxy, log, metrics)",
        ),
        Target(
            "gateway",
            base.format(gateway_port),
            [f"X-API-Key: {key}"],
            gateway,
            "the gateway's full pipeline: API key, rate limit and quota checked, proxy, log, "
            "metrics (with every payload policy configured on another API's routes)",
        ),
        Target(
            "gateway-cache-hit",
            f"http://127.0.0.1:{gateway_port}/policies/cached",
            [f"X-API-Key: {key}"],
            gateway,
            "the full pipeline answered from the response cache (key, limits, CORS, cache "
            "hit, log, metrics; no upstream call)",
        ),
    ]
    if chain is not None:
        describe = (
            f"nginx proxy_pass through {args.chain_hops} hops in one worker (a C proxy made to "
            "spend about the gateway's CPU per request at saturation: the control for latency "
            "at a similar load on its core)"
        )
        targets.insert(2, Target("nginx-chain", base.format(chain_ports[0]), [], chain, describe))
    # The same upstream with the client on the other core: every proxy's request crosses
    # between the cores (client -> proxy -> upstream and back), while `direct` stays on one.
    # What a crossing costs at the tail on this machine is the floor under any proxy's
    # added latency in this layout.
    targets.insert(
        1,
        Target(
            "direct-xcore",
            base.format(upstream_port),
            [],
            upstream,
            "the upstream nginx with the client on the server core: no proxy, but the "
            "request and the answer cross between the cores once each",
            client_core=server_core,
            fixed_only=True,
        ),
    )
    if args.without_policies:
        targets = [t for t in targets if t.name != "gateway-cache-hit"]
    if args.only:
        always = {"direct", "direct-xcore", "nginx", "nginx-chain"}
        wanted = {t.name for t in targets if t.name in always} | set(args.only.split(","))
        unknown = wanted - {t.name for t in targets}
        if unknown:
            raise BenchError(f"--only: no target {', '.join(sorted(unknown))}")
        targets = [t for t in targets if t.name in wanted]
    servers = {upstream.pid, proxy.pid, gateway.pid} | ({chain.pid} if chain else set())
    runner = Runner(procs, tools, (server_core, load_core), servers, args)
    runner.sent_to_gateway = 2  # the readiness and 401 checks

    loaded = [t for t in targets if not t.fixed_only]  # the wrk phase's targets
    if args.warmup > 0:
        log(f"warm-up: {args.warmup:g} s per target")
        for t in loaded:
            runner.wrk(t, args.warmup, 0)
    runs: list[WrkResult] = []
    for rnd in range(1, args.rounds + 1):
        shift = (rnd - 1) % len(loaded)
        order = loaded[shift:] + loaded[:shift]
        for t in order:
            r = runner.wrk(t, args.duration, rnd)
            runs.append(r)
            log(
                f"round {rnd} {t.name:8} {r.rps:10,.0f} rps  p50 {ms(r.p50_ms)}  "
                f"p99 {ms(r.p99_ms)}  errors {r.errors}"
            )

    fixed: list[dict] = []
    rates = list(args.rate_list)
    if args.half:
        # Added latency at half the full pipeline's saturation rate (capped: the Python
        # open-loop client cannot hold more than OPENLOOP_MAX_RPS).
        gw = [r.rps for r in runs if r.target == "gateway"]
        if gw:
            rates.append(min(OPENLOOP_MAX_RPS, round(median(gw) / 2, -1)))
    for rate in rates:
        # Rounds as for wrk: order rotated, so no target always runs first or after another.
        for rnd in range(1, args.fixed_rounds + 1):
            shift = (rnd - 1) % len(targets)
            for t in targets[shift:] + targets[:shift]:
                window_start = time.time()
                f = runner.fixed_rate(t, rate, args.fixed_duration)
                f["round"] = rnd
                f["window"] = (window_start, time.time())
                fixed.append(f)
                lat = f["latency_ms"]
                log(
                    f"fixed {rate:g} rps round {rnd} {t.name:8} p50 {ms(lat['p50'])}  "
                    f"p99 {ms(lat['p99'])}  statuses {f['statuses']} errors {f['errors']}"
                )

    # Stop the gateway now: on SIGTERM it drains its log buffer into the spool, which is the
    # gateway's own record of every status it answered.
    log("stopping the gateway; reading its log spool")
    procs.stop(gateway)
    if args.profile:
        import pstats

        for path in sorted(tmp.glob("gateway.prof.*")):
            print(f"\n## cProfile of the gateway worker ({path.name}), by own time\n")
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(35)
    checks = []
    wrk_errors = [r for r in runs if r.errors]
    if wrk_errors:
        checks.append(
            "**wrk reported errors**: "
            + "; ".join(
                f"{r.target} round {r.round}: non-2xx/3xx {r.non_2xx_3xx}, socket {r.socket_errors}"
                for r in wrk_errors
            )
        )
    else:
        checks.append("wrk: no non-2xx/3xx response and no socket error in any run.")
    bad_fixed = [
        f for f in fixed if any(v for v in f["errors"].values()) or set(f["statuses"]) - {"200"}
    ]
    if bad_fixed:
        checks.append(
            "**fixed-rate errors**: "
            + "; ".join(
                f"{f['target']}@{f['rate']:g}: {f['statuses']} {f['errors']}" for f in bad_fixed
            )
        )
    elif fixed:
        checks.append("Fixed-rate runs: every response was a 200.")
    events = spool_events(var_dir / "spool")
    total, statuses, errs = spool_summary(events)
    inside_gateway(events, fixed)
    status_text = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items(), key=str))
    checks.append(
        f"Gateway log events (its own record, from the spool): {total:,}, by status: "
        f"{status_text or 'none'}; error kinds: {dict(errs) or 'none'}. Requests the clients "
        f"completed against the gateway: {runner.sent_to_gateway:,}. (The gateway logs a few "
        "more: wrk stops with up to one request per connection in flight, answered but not "
        "counted by wrk; a 499 would be a request whose client left before any answer.)"
    )
    busy = [(f"{r.target} round {r.round}", r.usage) for r in runs if r.usage]
    busy += [(f"{f['target']} at {f['rate']:g} rps", Usage(**f["usage"])) for f in fixed]
    noisy = [(name, u.other_cpu_s / u.wall_s * 100) for name, u in busy if u.wall_s]
    noisy = [(name, pct) for name, pct in noisy if pct > OTHER_CPU_LIMIT]
    if noisy:
        checks.append(
            f"**The machine was not quiet**: other processes used more than {OTHER_CPU_LIMIT}% "
            "of a core during "
            + ", ".join(f"{name} ({pct:.0f}%)" for name, pct in noisy)
            + ". Those numbers are disturbed; run the bench again on an idle machine."
        )
    else:
        checks.append(
            f"Quiet machine: other processes used at most {OTHER_CPU_LIMIT}% of a core in every "
            f"run (before the start: {preflight:.0f}%)."
        )
    gw_log = (tmp / "gateway.log").read_text(errors="replace")
    bad_lines = [
        line
        for line in gw_log.splitlines()
        if re.search(r"\b(ERROR|CRITICAL|Traceback|WARNING)\b", line)
    ]
    if bad_lines:
        checks.append(
            f"**gateway log has {len(bad_lines)} warning/error lines**, first: "
            + " | ".join(f"`{line.strip()[:200]}`" for line in bad_lines[:5])
        )
    else:
        checks.append("Gateway process log: no warning or error line.")

    runtime = time.monotonic() - started
    report = render(info, args, (server_core, load_core), targets, runs, fixed, checks, runtime)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(report)
    raw = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items()},
        "runs": [r.__dict__ for r in runs],
        "fixed_rate": fixed,
        "gateway_spool": {"events": total, "statuses": {str(k): v for k, v in statuses.items()}},
        "runtime_s": runtime,
    }
    (RESULTS / "latest.json").write_text(json.dumps(raw, indent=2, default=str))
    print(report)
    log(f"wrote {RESULTS / 'latest.md'} in {runtime:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
