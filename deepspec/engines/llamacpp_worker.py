"""Runs inside the llama.cpp environment (the `xllamacpp` bindings), not ours:
`python llamacpp_worker.py REQUEST REPLY`.

It imports only the standard library and xllamacpp, so it must not import deepspec. REQUEST is a JSON file
{"model": GGUF path, "threads", "n_ctx", "max_new_tokens", "prompts": [[ids]]}; the prompts are decoded one at
a time, greedily, past any end-of-sequence token, by llama.cpp's server loop in this process. REPLY gets one
JSON object: per prompt the output token ids (read from the top-1 log-probabilities, which carry the ids) and
the wall time of the request. llama.cpp logs to stdout and stderr, which the host sends to a log file.
"""

from __future__ import annotations

import json
import sys
import time


def main(request_path: str, reply_path: str) -> None:
    import xllamacpp

    request = json.loads(open(request_path).read())
    params = xllamacpp.CommonParams()
    params.model.path = request["model"]
    params.n_ctx = int(request["n_ctx"])
    params.cpuparams.n_threads = int(request["threads"])
    params.cpuparams_batch.n_threads = int(request["threads"])
    server = xllamacpp.Server(params)
    first = request["prompts"][0]
    server.handle_completions({"prompt": first[:8], "max_tokens": 4, "temperature": 0.0})  # warm-up, untimed
    samples = []
    for prompt in request["prompts"]:
        t0 = time.perf_counter()
        out = server.handle_completions({"prompt": prompt, "max_tokens": request["max_new_tokens"], "temperature": 0.0,
                                         "ignore_eos": True, "logprobs": 1})
        wall = time.perf_counter() - t0
        if "error" in out:
            raise RuntimeError(json.dumps(out["error"]))
        content = out["choices"][0]["logprobs"]["content"]
        samples.append({"token_ids": [int(t["id"]) for t in content], "wall_time": wall})
    with open(reply_path, "w") as f:
        json.dump({"samples": samples}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
