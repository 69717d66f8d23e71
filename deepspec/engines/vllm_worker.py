"""Runs inside the vLLM environment, not ours: `python vllm_worker.py request.json result.json`.

It imports only the standard library and vLLM (whose pinned transformers differs from ours), so it must
not import deepspec. The request names the model folder, token-id prompts and the speculative config;
the result holds, per prompt decoded alone, the output token ids and wall time, and vLLM's spec-decode
counters over those prompts (warm-up excluded). vLLM runs its engine core in a spawned process, hence the
`__main__` guard.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _counters(llm) -> dict[str, float | list[float]]:
    """vLLM's own spec-decode counters (drafting rounds, drafted and accepted tokens, accepted per position)."""
    out: dict[str, float | list[float]] = {}
    for m in llm.get_metrics():
        if not m.name.startswith("vllm:spec_decode"):
            continue
        key = m.name.removeprefix("vllm:spec_decode_")
        if hasattr(m, "values"):
            out[key] = [float(v) for v in m.values]
        elif hasattr(m, "value"):
            out[key] = float(m.value)
    return out


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        b = before.get(k)
        if isinstance(v, list):
            b = b or [0.0] * len(v)
            out[k] = [x - y for x, y in zip(v, b + [0.0] * (len(v) - len(b)))]
        else:
            out[k] = v - (b or 0.0)
    return out


def run(req: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    no_tokenizer = req.get("skip_tokenizer_init", False)  # a model folder without one: token ids in and out
    llm = LLM(model=req["model"], dtype=req.get("dtype", "float32"), enforce_eager=True,
              max_model_len=req["max_model_len"], speculative_config=req.get("speculative_config"),
              seed=req.get("seed", 0), disable_log_stats=False, skip_tokenizer_init=no_tokenizer)
    params = SamplingParams(temperature=req.get("temperature", 0.0), max_tokens=req["max_new_tokens"],
                            seed=req.get("seed", 0), ignore_eos=req.get("ignore_eos", False),
                            detokenize=not no_tokenizer)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
    warm = SamplingParams(temperature=0.0, max_tokens=4, detokenize=not no_tokenizer)
    llm.generate(prompts[:1], warm, use_tqdm=False)
    before = _counters(llm)
    samples = []
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
        samples.append({"token_ids": list(out.token_ids), "wall_time": time.perf_counter() - t0})
    return {"samples": samples, "counters": _delta(_counters(llm), before)}


if __name__ == "__main__":
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path, encoding="utf-8") as fh:
        request = json.load(fh)
    result = run(request)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, result_path)
