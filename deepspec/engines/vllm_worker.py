"""Runs inside the vLLM environment, not ours: `python vllm_worker.py REPLY_FD`.

It imports only the standard library and vLLM (whose pinned transformers differs from ours), so it must
not import deepspec. It serves one engine: requests come one JSON object a line on stdin, and each reply
goes as one JSON line to file descriptor REPLY_FD (vLLM logs to stdout and stderr, which the host sends to
a log file). Requests:

  {"op": "load", "model", "speculative_config", "max_model_len", "dtype", "seed"}    start the engine
  {"op": "generate", "prompts": [[ids]], "max_new_tokens", "temperature", "stop_token_ids", "ignore_eos"}
      one batch of token-id prompts submitted together; the reply holds each output's token ids, the batch's
      wall time and vLLM's spec-decode counters over it (drafting rounds, drafted and accepted tokens,
      accepted per position)
  {"op": "quit"}

A failed request replies {"error": "..."}. vLLM runs its engine core in a spawned process, hence the
`__main__` guard.
"""

from __future__ import annotations

import json
import sys
import time


def _counters(llm) -> dict[str, float | list[float]]:
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


class Worker:
    def __init__(self):
        self.llm = None

    def load(self, req: dict) -> dict:
        from vllm import LLM

        # Token ids in and out: the host tokenizes with its own chat template and stops on its own stop ids.
        self.llm = LLM(model=req["model"], dtype=req.get("dtype", "float32"), enforce_eager=True,
                       max_model_len=req["max_model_len"], speculative_config=req.get("speculative_config"),
                       seed=req.get("seed", 0), disable_log_stats=False, skip_tokenizer_init=True)
        import vllm

        return {"vllm": vllm.__version__}

    def generate(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=req.get("temperature", 0.0), max_tokens=req["max_new_tokens"],
                                seed=req.get("seed", 0), ignore_eos=req.get("ignore_eos", False),
                                stop_token_ids=req.get("stop_token_ids") or None, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
        before = _counters(self.llm)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "wall_time": wall,
                "counters": _delta(_counters(self.llm), before)}


def serve(reply_fd: int) -> None:
    worker = Worker()
    with open(reply_fd, "w", encoding="utf-8") as replies:
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "quit":
                break
            try:
                reply = getattr(worker, req["op"])(req)
            except Exception as err:  # noqa: BLE001 - the host turns it into a one-line engine error
                reply = {"error": " ".join(f"{type(err).__name__}: {err}".split())[:800]}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
