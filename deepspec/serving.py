"""`deepspec serve`: the target behind an OpenAI-compatible completions endpoint, as vLLM and SGLang serve it.

For tests and small jobs (regeneration against a real HTTP server, on this machine); at scale, point
`train_data.servers` at vLLM or SGLang instead. One request generates at a time, with the same batched
generation `deepspec prepare --train` runs in process. Endpoints: GET /v1/models, POST /v1/completions
(`prompt` as a string or token ids; `max_tokens`, `temperature`, `seed`; the answer carries `token_ids`,
stop token included, as vLLM's `return_token_ids` does).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: "CompletionServer"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise in job logs
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        blob = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/health"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            self._send(200, self.server.complete(body))
        except (ValueError, KeyError, TypeError) as err:
            self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})


class CompletionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model: str, dtype: str = "float32", max_len: int = 4096):
        from deepspec.config import TrainDataConfig
        from deepspec.data.regenerate import Generate
        from deepspec.models import load_model

        self.loaded = load_model(model, dtype)
        self.model_name = model
        tok = self.loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.loaded.eos_ids[0]
        self.generate = Generate(self.loaded, TrainDataConfig(), pad, max_len)
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = self.loaded.tokenizer.encode(prompt, add_special_tokens=False)
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            raise ValueError("prompt: a string or a non-empty list of token ids")
        max_tokens = int(body.get("max_tokens", 16))
        with self.lock:
            ids = self.generate([prompt], int(body.get("seed") or 0), max_tokens, float(body.get("temperature", 1.0)))[0]
        stopped = bool(ids) and ids[-1] in self.loaded.eos_ids
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "text": self.loaded.tokenizer.decode(ids, skip_special_tokens=True),
                             "token_ids": ids, "finish_reason": "stop" if stopped else "length", "logprobs": None}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                          "total_tokens": len(prompt) + len(ids)}}


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32", max_len: int = 4096) -> None:
    try:
        server = CompletionServer((host, port), model, dtype, max_len)
    except OSError as err:
        raise RuntimeError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    print(f"[serve] {model} on http://{host}:{server.server_address[1]}/v1 (completions)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
