"""Regeneration through real OpenAI-compatible server processes (`deepspec serve`): a server killed mid-run
and a client killed mid-run cost nothing, no sample is lost or written twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.conftest import pipeline_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(target_dir) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "deepspec.cli", "serve", "--model", str(target_dir), "--port",
                             str(port), "--max-len", "256"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, until_up(proc, port, str(target_dir), 120, lambda: proc.stderr.read().decode()[-2000:])


def until_up(proc: subprocess.Popen, port: int, model_id: str, timeout: float, why) -> str:
    """The server's base URL once it lists `model_id` at /v1/models; `why()` says what went wrong if it exits."""
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=1) as resp:
                assert json.loads(resp.read())["data"][0]["id"] == model_id
                return url
        except OSError:
            assert proc.poll() is None, why()
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the server on port {port} did not come up")


@pytest.fixture
def servers(tiny_target_dir):
    procs = [_serve(tiny_target_dir) for _ in range(2)]
    yield procs
    for proc, _ in procs:
        proc.kill()
        proc.wait()


def _config(tmp_path, target_dir, name: str, urls: list[str]) -> tuple[str, object]:
    base = pipeline_config(tmp_path / name, target_dir)
    raw = base.model_dump(mode="json")
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "turns": [f"Tell me about topic {i}.", "And more?"]}) + "\n"
                             for i in range(24)))
    raw["train_data"].update(source=str(convs), max_samples=24, batch_size=2, temperature=0.0, backend="openai",
                             servers=urls, concurrency=2, retries=8, timeout_s=30)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    from deepspec.config import load

    return str(path), load(path)


def _client(config: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepspec.cli", "prepare", "--train", "--config", config], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_batches(partial, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.is_file() and len({json.loads(line)["batch"] for line in partial.read_text().splitlines()
                                      if line.endswith("}")}) >= n:
            return
        assert proc.poll() is None, "the client finished before it could be interrupted"
        time.sleep(0.005)
    raise TimeoutError("no batch was written")


def _records(cfg) -> list[dict]:
    from deepspec import io
    from deepspec.layout import train_data_file

    return io.read_jsonl(train_data_file(cfg))


def test_server_and_client_killed_mid_run_lose_and_repeat_nothing(tmp_path, tiny_target_dir, servers):
    from deepspec.data.regenerate import regenerate
    from deepspec.layout import train_data_file

    urls = [url for _, url in servers]
    _, whole_cfg = _config(tmp_path, tiny_target_dir, "whole", urls)
    regenerate(whole_cfg)
    reference = _records(whole_cfg)
    assert len(reference) == 24 and len({r["id"] for r in reference}) == 24
    assert all(sum(r["loss_mask"]) > 0 for r in reference)

    # A server dies while the client runs: its requests go to the other one.
    path, cfg = _config(tmp_path, tiny_target_dir, "server_killed", urls)
    client = _client(path)
    partial = train_data_file(cfg).with_name("regenerated.jsonl.partial")
    _wait_for_batches(partial, 2, client)
    servers[0][0].send_signal(signal.SIGKILL)
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err[-2000:]
    assert "requests retried" in out
    assert _records(cfg) == [dict(r) for r in reference]

    # The client dies: the rerun keeps its whole batches and writes the rest.
    path, cfg = _config(tmp_path, tiny_target_dir, "client_killed", urls)
    client = _client(path)
    _wait_for_batches(partial := train_data_file(cfg).with_name("regenerated.jsonl.partial"), 3, client)
    client.send_signal(signal.SIGKILL)
    client.wait()
    kept = len(partial.read_text().splitlines())
    assert 0 < kept < 24
    rerun = _client(path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert "already done" in out and " 0 already done" not in out
    assert _records(cfg) == [dict(r) for r in reference]


def test_openai_backend_needs_servers(tmp_path):
    from deepspec.config import ConfigError, validate

    with pytest.raises(ConfigError, match="train_data: servers: backend 'openai' needs at least one server base URL"):
        validate({"tasks": {"t": {"kind": "humaneval"}}, "methods": {"ar": {"kind": "autoregressive"}},
                  "train_data": {"backend": "openai"}})


def test_serve_on_a_taken_port_is_one_line(tiny_target_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "deepspec.cli", "serve", "--model", str(tiny_target_dir), "--port",
                               str(port)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"deepspec serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)"
