"""Run `tinyvllm serve` as a real process on a free localhost port, for the server tests.

    with serve(model_dir, "--api-key", "k") as server:     # waits for /health
        httpx.get(server.url + "/v1/models")
    # the process is stopped (SIGTERM, then SIGKILL) whatever happened

Module-scoped fixtures share one server per test module, which keeps the tests fast.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fixtures import release_gpu_memory

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """/metrics as {sample name{labels}: value}, e.g. 'tinyvllm:num_free_kv_blocks'."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits; return the last metrics."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["tinyvllm:num_requests_running"] == 0 and m["tinyvllm:num_requests_waiting"] == 0:
                return m
            if time.time() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.05)


@contextmanager
def serve(model: Path | str, *args: str, tmp_dir: Path, timeout: float = 180.0):
    release_gpu_memory()
    port = free_port()
    log = Path(tmp_dir) / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "tinyvllm", "serve", str(model), "--port", str(port), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tinyvllm serve exited with {proc.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"tinyvllm serve did not become healthy in {timeout} s:\n{server.log_text()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited in ``timeout`` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
