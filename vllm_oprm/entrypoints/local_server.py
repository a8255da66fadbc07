"""``vllm-oprm serve`` as a child process on 127.0.0.1 and a free port: one Ray Serve replica's
server, and the server that tests and benchmarks talk to."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class LocalServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen  # the launcher; the engine processes are its descendants
    log_path: str  # its stdout and stderr

    @property
    def pid(self) -> int:
        return self.process.pid

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the launcher's process group (vLLM shuts down cleanly), SIGKILL after 60 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_local_server(
    model: str,
    server_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300,
    launcher: Sequence[str] | None = None,
) -> LocalServer:
    """Start ``vllm-oprm serve MODEL ARGS`` (or ``launcher MODEL ARGS``, e.g. vLLM's own server) and wait
    for ``/health``; on failure, a RuntimeError with the log's tail.

    ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB (vLLM's CPU build refuses to start without it)."""
    port = free_port()
    launcher = launcher or [os.path.join(os.path.dirname(sys.executable), "vllm-oprm"), "serve"]
    command = [*launcher, model, "--host", "127.0.0.1", "--port", str(port), *server_args]
    environ = {**os.environ, **(env or {})}
    environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.NamedTemporaryFile("w", prefix="vllm-oprm-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    server = LocalServer(f"http://127.0.0.1:{port}", process, log.name)
    deadline = time.monotonic() + timeout_s
    while not server.healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            with open(log.name) as written:
                tail = written.read()[-3000:]
            raise RuntimeError(f"{' '.join(launcher)} did not come up (exit code {process.poll()}); log {log.name}:\n{tail}")
        time.sleep(1)
    return server
