"""1 GiB streamed each way through the gateway (part of `make bench`).

The gateway (gunicorn, one worker, embedded defaults) in front of the demo upstream, on an
anonymous route without a body limit. curl downloads GIB bytes (`/bytes/N`, streamed by the
upstream in 64 KiB chunks) to /dev/null, then uploads GIB bytes read from /dev/zero (chunked)
to `/anything`, which counts them. Reported: time, throughput, and the gateway worker's peak
resident memory (VmHWM) against its size before: streaming must not hold bodies.

    .venv/bin/python bench/stream.py [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchutil import embedded_env, free_port  # noqa: E402 - bench/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETUP = """\
from django.db import transaction
from gateway.config import config_bump
from gateway.models import Api, Route, Target, Upstream
with transaction.atomic():
    up = Upstream.objects.create(name="stream", read_timeout=600)
    Target.objects.create(upstream=up, host="127.0.0.1", port={port})
    api = Api.objects.create(name="Stream", slug="stream", path_prefix="/s", upstream=up)
    Route.objects.create(api=api, name="all", path="/", anonymous=True, max_body_bytes=0)
    config_bump(reason="stream bench")
"""


def memory(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    if not shutil.which("curl"):
        print("(stream bench skipped: curl is not installed)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="apigw-stream-bench-"))
    up_port, gw_port = free_port(), free_port()
    env = embedded_env(
        str(tmp),
        GATEWAY_BIND=f"127.0.0.1:{gw_port}",
        GATEWAY_OPS_BIND=f"127.0.0.1:{free_port()}",
    )
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=300,
        )
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-v", "0", "-c", SETUP.format(port=up_port)],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=120,
        )
        for cmd in (
            [str(BIN / "uvicorn"), "gateway.demo_upstream:app", "--port", str(up_port)]
            + ["--no-access-log", "--log-level", "warning"],
            [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
        ):
            log = open(tmp / f"{Path(cmd[0]).name}.log", "wb")  # noqa: SIM115 - lives with it
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
        url = f"http://127.0.0.1:{gw_port}/s"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/x", timeout=2):  # noqa: S310 - loopback
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        workers = subprocess.run(
            ["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        worker = int(workers[0])
        before = memory(worker, "VmRSS")
        rows = []
        started = time.perf_counter()
        down = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", f"{url}/bytes/{size}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=1200,
        )
        took = time.perf_counter() - started
        assert int(down.stdout) == size, down.stdout
        rows.append(("download", took, memory(worker, "VmHWM") - before))
        started = time.perf_counter()
        with subprocess.Popen(
            ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE
        ) as src:
            up = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-T",
                    "-",
                    "-H",
                    "Content-Type: application/octet-stream",
                    f"{url}/anything",
                ],  # fmt: skip
                stdin=src.stdout,
                capture_output=True,
                text=True,
                check=True,
                timeout=1200,
            )
        took = time.perf_counter() - started
        assert json.loads(up.stdout)["body_size"] == size, up.stdout[:200]
        rows.append(("upload", took, memory(worker, "VmHWM") - before))
        print("| direction | bytes | seconds | MiB/s | worker peak RSS growth |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, took, growth in rows:
            print(
                f"| {name} | {size:,} | {took:.1f} | {size / 2**20 / took:,.0f} | "
                f"{growth / 2**20:.1f} MiB |"
            )
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
