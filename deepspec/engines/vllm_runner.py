"""Decoding through real vLLM (its CPU build), in its own environment, on the same token-id prompts as ours.

`VllmSession` keeps one vLLM engine alive in a worker process (`vllm_worker.py`, run by the engine
environment's interpreter) and sends it batches of prompts, so a multi-turn conversation can be driven
from here with our tokenizer and chat template, turn by turn. This side pins the threads, and reads back
outputs, timings and vLLM's own spec-decode counters.

How vLLM's τ maps onto ours: vLLM counts drafting rounds (`num_drafts`), drafted and accepted tokens; a
round commits its accepted drafts plus one token of the target's own (the bonus), so its mean accepted
length is 1 + accepted / drafts. Ours is committed tokens per target forward, prefill included. The like
for like figure is ours over drafted rounds only: 1 + accepted drafts / drafted rounds (`rounds_tau`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from deepspec.config_base import DrafterBase, TrainedMethod
from deepspec.drafters.registry import KINDS
from deepspec.engines.env import EngineEnv, EngineError, isolated_env

WORKER = Path(__file__).with_name("vllm_worker.py")


def threads_env(threads: int, env: EngineEnv | None = None) -> dict[str, str]:
    """OpenMP threads bound to cores 0..threads-1 and none reserved, so vLLM computes on as many cores as our
    engine does (by default it binds one core and reserves the other for its front end); and Intel's OpenMP
    preloaded from the environment where it is there, as vLLM's CPU install guide asks (without it vLLM warns
    that speculative decoding on x86 loses much of its speed)."""
    out = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    iomp = env.folder / "lib" / "libiomp5.so" if env is not None else None
    if iomp is not None and iomp.is_file():
        out["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), os.environ.get("LD_PRELOAD")]))
    return out


def process_env(threads: int, env: EngineEnv | None = None) -> dict[str, str]:
    """The whole environment of a vLLM process: `isolated_env` plus `threads_env`."""
    return isolated_env(threads_env(threads, env))


class VllmSession:
    """One vLLM engine over `model` (an HF folder) with `speculative_config` (None: autoregressive), alive
    for the `with` block. Its log (vLLM's stdout and stderr) goes to `log`."""

    def __init__(self, env: EngineEnv, model: str | Path, *, threads: int = 2, speculative_config: dict | None = None,
                 max_model_len: int = 2048, dtype: str = "float32", seed: int = 0, log: Path | None = None):
        self.env, self.threads, self.log = env, threads, log
        self.load_request = {"op": "load", "model": _absolute(model), "speculative_config": speculative_config,
                             "max_model_len": max_model_len, "dtype": dtype, "seed": seed}
        self.version = env.version

    def __enter__(self) -> "VllmSession":
        self._tmp = tempfile.TemporaryDirectory(prefix="deepspec-vllm-")
        log = self.log or Path(self._tmp.name) / "vllm.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_path, self._log = log, open(log, "w")
        read_fd, write_fd = os.pipe()
        self._proc = subprocess.Popen([str(self.env.python), str(WORKER), str(write_fd)], stdin=subprocess.PIPE,
                                      stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), text=True,
                                      env=process_env(self.threads, self.env), cwd=self._tmp.name)
        os.close(write_fd)
        self._replies = os.fdopen(read_fd, "r", encoding="utf-8")
        try:
            self.version = self._call(self.load_request).get("vllm", self.version)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 stop_token_ids: list[int] = (), ignore_eos: bool = False, seed: int = 0) -> dict[str, Any]:
        """One batch, submitted together: {"token_ids": [...], "wall_time": s, "counters": {...}}."""
        return self._call({"op": "generate", "prompts": prompts, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "stop_token_ids": list(stop_token_ids),
                           "ignore_eos": ignore_eos, "seed": seed})

    def _call(self, request: dict) -> dict:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._replies.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            raise EngineError(f"engine vllm: `{request['op']}` failed, the worker exited: {self._last_log_line()} "
                              f"(log: {self._log_path})")
        reply = json.loads(line)
        if "error" in reply:
            raise EngineError(f"engine vllm: `{request['op']}` failed: {reply['error']} (log: {self._log_path})")
        return reply

    def _last_log_line(self) -> str:
        self._log.flush()
        lines = [x for x in Path(self._log_path).read_text(errors="replace").splitlines() if x.strip()]
        return lines[-1] if lines else f"exit {self._proc.poll()}"

    def __exit__(self, *exc) -> None:
        try:
            if self._proc.poll() is None:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=120)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._replies.close()
        self._log.close()
        self._tmp.cleanup()


def decode(env: EngineEnv, model: str | Path, prompts: list[list[int]], max_new_tokens: int, *, threads: int = 2,
           speculative_config: dict | None = None, temperature: float = 0.0, max_model_len: int = 2048,
           ignore_eos: bool = False, stop_token_ids: list[int] = (), log: Path | None = None) -> dict[str, Any]:
    """`prompts` decoded one at a time after a short warm-up: {"samples": [{"token_ids", "wall_time"}],
    "counters": vLLM's spec-decode counters over them, "threads", "version"}."""
    with VllmSession(env, model, threads=threads, speculative_config=speculative_config,
                     max_model_len=max_model_len, log=log) as session:
        session.generate(prompts[:1], 4)
        samples, counters = [], {}
        for p in prompts:
            out = session.generate([p], max_new_tokens, temperature=temperature, ignore_eos=ignore_eos,
                                   stop_token_ids=stop_token_ids)
            samples.append({"token_ids": out["token_ids"][0], "wall_time": out["wall_time"]})
            counters = add_counters(counters, out["counters"])
    return {"samples": samples, "counters": counters, "threads": threads, "version": session.version}


def add_counters(a: dict, b: dict) -> dict:
    """Counters of two batches together (lists element by element)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, list):
            old = list(out.get(k) or [])
            old += [0.0] * (len(v) - len(old))
            out[k] = [x + y for x, y in zip(old, v + [0.0] * (len(old) - len(v)))]
        else:
            out[k] = out.get(k, 0.0) + v
    return out


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


def speculative_config(method, export: str | Path | None = None, drafter: DrafterBase | None = None) -> dict | None:
    """vLLM's `speculative_config` for one of our method configs (None: autoregressive); a ValueError says
    why vLLM cannot run it. Trained drafters decode from `export`, their vLLM layout (`drafter`: the config
    they were trained from; None for a published checkpoint); vLLM drafts chains, so a tree method runs
    there as the chain of its depth, and a block method as its whole block."""
    kind = method.kind
    if kind == "autoregressive":
        return None
    if kind == "ngram":
        if method.branches != 1:
            raise ValueError("vLLM's prompt lookup drafts one continuation (branches must be 1)")
        return {"method": "ngram", "num_speculative_tokens": method.num_draft,
                "prompt_lookup_max": method.ngram_max, "prompt_lookup_min": method.ngram_min}
    if kind == "suffix":
        return {"method": "suffix", "num_speculative_tokens": method.max_spec_tokens,
                "suffix_decoding_max_tree_depth": method.max_depth,
                "suffix_decoding_max_spec_factor": method.spec_factor,
                "suffix_decoding_min_token_prob": method.min_token_prob,
                "suffix_decoding_max_cached_requests": method.max_cached_outputs if method.global_cache else 0}
    if kind == "draft_lm":
        if method.model is None or method.layers is not None or method.quantize != "none":
            raise ValueError("vLLM drafts with a model folder of its own: set `model`, without `layers` or `quantize`")
        return {"method": "draft_model", "model": _absolute(method.model), "num_speculative_tokens": method.depth}
    if isinstance(method, TrainedMethod):
        if export is None:
            raise ValueError(f"a {kind} method decodes in vLLM from its drafter exported to the vllm layout")
        name, drafts = KINDS[drafter.kind if drafter is not None else method.decodes[0]].vllm_proposer(method, drafter)
        return {"method": name, "model": _absolute(export), "num_speculative_tokens": drafts}
    raise ValueError(f"vLLM has no proposer for our method kind {kind!r}")


def _absolute(model: str | Path) -> str:
    """A local folder as an absolute path (the worker runs elsewhere); a hub id as it is."""
    return str(Path(model).resolve()) if Path(model).exists() else str(model)
