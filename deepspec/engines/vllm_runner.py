"""Decoding through real vLLM (its CPU build), in its own environment, on the same token-id prompts as ours.

The worker (`vllm_worker.py`) runs under the engine environment's interpreter; this side writes the request,
pins the threads, and reads back outputs, timings and vLLM's own spec-decode counters.

How vLLM's τ maps onto ours: vLLM counts drafting rounds (`num_drafts`), drafted and accepted tokens; a
round commits its accepted drafts plus one token of the target's own (the bonus), so its mean accepted
length is 1 + accepted / drafts. Ours is committed tokens per target forward, prefill included. The like
for like figure is ours over drafted rounds only: 1 + accepted drafts / drafted rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from deepspec.engines.env import EngineEnv, EngineError

WORKER = Path(__file__).with_name("vllm_worker.py")


def threads_env(threads: int) -> dict[str, str]:
    """OpenMP threads bound to cores 0..threads-1 and none reserved, so vLLM computes on as many cores as our
    engine does (by default it binds one core and reserves the other for its front end)."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def decode(env: EngineEnv, model: str | Path, prompts: list[list[int]], max_new_tokens: int, *, threads: int = 2,
           speculative_config: dict | None = None, temperature: float = 0.0,
           max_model_len: int = 2048, ignore_eos: bool = False, skip_tokenizer_init: bool = False,
           log: Path | None = None, timeout: float = 3600) -> dict[str, Any]:
    """One vLLM engine over `prompts`, one at a time; see the worker for the result."""
    request = {"model": str(model), "prompts": prompts, "max_new_tokens": max_new_tokens,
               "speculative_config": speculative_config, "temperature": temperature,
               "max_model_len": max_model_len, "ignore_eos": ignore_eos, "skip_tokenizer_init": skip_tokenizer_init}
    with tempfile.TemporaryDirectory(prefix="deepspec-vllm-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        done = subprocess.run([str(env.python), str(WORKER), str(req), str(out)], capture_output=True, text=True,
                              env={**os.environ, **threads_env(threads)}, timeout=timeout, cwd=tmp)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not out.is_file():
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise EngineError(f"engine vllm: decoding failed: {lines[-1] if lines else f'exit {done.returncode}'}")
        result = json.loads(out.read_text())
    result["threads"] = threads
    return result


def tau(counters: dict[str, Any]) -> float | None:
    """vLLM's mean accepted length over drafting rounds (bonus token included); None when nothing was drafted."""
    drafts = counters.get("num_drafts") or 0
    return 1 + counters.get("num_accepted_tokens", 0) / drafts if drafts else None


def acceptance_by_position(counters: dict[str, Any]) -> list[float]:
    """P(position d accepted | position d-1 accepted), our `acceptance_by_depth` convention."""
    per = counters.get("num_accepted_tokens_per_pos") or []
    drafts = counters.get("num_drafts") or 0
    out, before = [], drafts
    for n in per:
        if not before:
            break
        out.append(n / before)
        before = n
    return out
