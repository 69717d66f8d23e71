"""Regeneration through OpenAI-compatible completion servers (vLLM, SGLang, `deepspec serve`).

A batch's prompts go out as token ids, `concurrency` requests at a time, spread over `servers`. A
request that fails (refused connection, timeout, 5xx, 429) is retried on the next server with backoff,
up to `retries` times; a 4xx is a mistake in the request and stops the run. The crash safety is the
caller's: a batch is written only once all its answers are in, so a killed server costs retries and a
killed client resumes at the first missing batch, with no duplicate and no gap.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from deepspec.config import TrainDataConfig


class ServerError(RuntimeError):
    pass


class ServerGenerate:
    backend = "openai"

    def __init__(self, td: TrainDataConfig, model: str, tokenizer, eos_ids: list[int]):
        self.td, self.model, self.tokenizer, self.eos_ids = td, model, tokenizer, eos_ids
        self.urls = [u.rstrip("/") for u in td.servers]
        self.failures = 0  # requests retried (a dead server's share), for the summary
        self._next = 0

    def __call__(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        start = self._next
        self._next += len(prompts)
        with ThreadPoolExecutor(min(self.td.concurrency, len(prompts))) as pool:
            futures = [pool.submit(self._one, p, seed * 1009 + i, start + i) for i, p in enumerate(prompts)]
            return [f.result() for f in futures]

    def _one(self, prompt: list[int], seed: int, slot: int) -> list[int]:
        td = self.td
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": td.max_new_tokens,
                           "temperature": td.temperature, "seed": seed, "return_token_ids": True,
                           "skip_special_tokens": True, **td.server_params}).encode()
        last = ""
        for attempt in range(td.retries + 1):
            url = self.urls[(slot + attempt) % len(self.urls)]
            request = urllib.request.Request(f"{url}/completions", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=td.timeout_s) as resp:
                    return self._answer(json.loads(resp.read()))
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code != 429:
                    detail = err.read().decode(errors="replace")[:300]
                    raise ServerError(f"train_data.servers: {url} refused the request ({err.code}: {detail})") from None
                last = f"{url}: HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{url}: {getattr(err, 'reason', err)}"
            self.failures += 1
            time.sleep(min(0.2 * 2**attempt, 5.0))
        raise ServerError(f"train_data.servers: no server answered after {td.retries + 1} attempts (last: {last})")

    def _answer(self, reply: dict[str, Any]) -> list[int]:
        """The answer's token ids, ending at and including its stop token as the in-process backends do."""
        choice = reply["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:  # a server without return_token_ids: the text, re-tokenised
            ids = self.tokenizer.encode(choice["text"], add_special_tokens=False)
            if choice.get("finish_reason") == "stop":
                ids.append(self.eos_ids[0])
        ids = list(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: i + 1]
        return ids[: self.td.max_new_tokens]
