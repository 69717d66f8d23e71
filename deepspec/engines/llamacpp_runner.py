"""Decoding through real llama.cpp (the `xllamacpp` bindings' CPU wheel), in its own environment, on the GGUF
our packaged target is converted from: the autoregressive rate a CPU user would get from the engine they
would pick instead of ours. llama.cpp computes with the GGUF's own quantized kernels (Q4_1 for the packaged
SmolLM2), our engine with those weights dequantized to float32, so outputs agree until the first near-tie."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from deepspec.engines.env import EngineEnv, EngineError, isolated_env

WORKER = Path(__file__).with_name("llamacpp_worker.py")


def decode(env: EngineEnv, gguf: str | Path, prompts: list[list[int]], max_new_tokens: int, *, threads: int = 2,
           n_ctx: int = 2048, log: Path | None = None) -> dict:
    """Greedy outputs (token ids) and wall time per prompt, one prompt at a time, `threads` threads."""
    with tempfile.TemporaryDirectory(prefix="deepspec-llamacpp-") as tmp:
        request, reply = Path(tmp) / "request.json", Path(tmp) / "reply.json"
        request.write_text(json.dumps({"model": str(Path(gguf).resolve()), "threads": threads, "n_ctx": n_ctx,
                                       "max_new_tokens": max_new_tokens, "prompts": prompts}))
        sink = open(log, "w") if log is not None else subprocess.DEVNULL
        try:
            done = subprocess.run([str(env.python), str(WORKER), str(request), str(reply)], stdout=sink,
                                  stderr=subprocess.STDOUT, env=isolated_env({"OMP_NUM_THREADS": str(threads)}), cwd=tmp)
        finally:
            if log is not None:
                sink.close()
        if done.returncode != 0 or not reply.is_file():
            raise EngineError(f"engine llamacpp: decoding {gguf} failed (exit {done.returncode}); see {log}")
        return json.loads(reply.read_text())
