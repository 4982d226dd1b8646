"""A small OpenAI-compatible chat server around any synchronous :class:`~vigorl_cli.engines.base.Engine`.

It speaks the subset of vLLM's OpenAI server that :class:`~vigorl_cli.engines.openai.OpenAIEngine` uses, so the
async pool can be exercised (and used) without vLLM, e.g. over the HF engine on a CPU box or in tests:

* ``POST /v1/chat/completions``: ``messages`` whose content is a string or a list of ``text`` and ``image_url``
  parts (``data:`` URLs only: base64 PNG/JPEG/...). The processor's chat template is applied
  (``add_generation_prompt`` default true, ``continue_final_message`` default false, vLLM's flags), the text is
  tokenized with one ``<|image_pad|>`` per image (the engine-protocol form) and handed to ``engine.generate``.
  Sampling fields: ``n``, ``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``, ``stop``, ``seed``,
  ``logprobs``, and vLLM's extras ``top_k``, ``repetition_penalty``, ``return_token_ids``,
  ``include_stop_str_in_output``, ``skip_special_tokens``. Each choice carries ``message.content``,
  ``finish_reason``, vLLM's ``stop_reason`` (the stop string; ``null`` for eos), with ``return_token_ids`` the
  completion ``token_ids`` (exactly what the engine sampled, a final eos included) and top-level
  ``prompt_token_ids``, and with ``logprobs`` ``{"content": [{"token", "logprob", "bytes", "top_logprobs": []}]}``
  (the engine's raw policy log-probs; ``-inf`` is sent as -9999.0, as vLLM does).
* ``GET /v1/models`` and ``GET /health``.

The content text follows vLLM: special tokens are skipped (``skip_special_tokens`` default true) and the stop
string is cut off unless ``include_stop_str_in_output`` is set.

Engine calls are serialised (one lock, which several servers over one model may share) and **micro-batched**:
requests that arrive within ``batch_window_ms`` of the first are sent in one ``engine.generate`` call (at most
``max_batch``), as a continuous-batching server would. If a batched call fails, its requests are retried one by
one so that one bad request cannot fail its neighbours.

Failure injection (tests, chaos runs): ``fail_first=K`` answers the first K chat requests with ``fail_status``
(503 by default); ``delay_s`` sleeps before every chat request (for client timeouts). Both are attributes that may
be changed while serving; the CLI takes ``--fail-first``/``--delay-s`` or ``VIGORL_SERVER_FAIL_FIRST``/
``VIGORL_SERVER_DELAY_S``. ``stats["in_flight"]`` / ``stats["max_in_flight"]`` count the chat requests being
handled now and at the peak (a client's concurrency limit can be checked against them).

Run: ``python -m vigorl_cli.engines.server --model tiny-qwen2.5-vl --port 8000``. Only the standard library is used
for HTTP (``http.server.ThreadingHTTPServer``), so it is a test and small-scale tool, not a production server.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import math
import os
import queue
import socketserver
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams


class BadRequest(Exception):
    """A client error: answered with HTTP 400."""


def decode_data_url(url: str) -> Image.Image:
    """``data:image/...;base64,...`` → a loaded PIL image."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest("only data: URLs are supported for images (base64-encoded)")
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise BadRequest("image data URLs must be base64-encoded")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        img.load()
    except (binascii.Error, OSError, ValueError) as e:
        raise BadRequest(f"cannot decode image: {e}") from None
    return img


# -- micro-batching ----------------------------------------------------------------------------------------------------
class _Item:
    __slots__ = ("done", "error", "req", "result")

    def __init__(self, req: GenerationRequest):
        self.req = req
        self.done = threading.Event()
        self.result: list[Completion] | None = None
        self.error: BaseException | None = None


class _Batcher:
    """Collects requests arriving within a short window into one ``engine.generate`` call."""

    def __init__(self, engine: Any, lock: threading.Lock, window_s: float, max_batch: int, on_batch=None):
        self.engine = engine
        self.lock = lock
        self.window_s = max(0.0, window_s)
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="vigorl-server-batcher", daemon=True)
        self.thread.start()

    def submit(self, req: GenerationRequest) -> list[Completion]:
        item = _Item(req)
        self.q.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            batch, stop = [item], False
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self.q.get(timeout=remaining) if remaining > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run(batch)
            if stop:
                break
        while True:  # anything still queued at shutdown gets an answer
            try:
                left = self.q.get_nowait()
            except queue.Empty:
                break
            if left is not None:
                left.error = RuntimeError("server is shutting down")
                left.done.set()

    def _run(self, batch: list[_Item]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        with self.lock:
            try:
                outs = self.engine.generate([b.req for b in batch])
                for b, o in zip(batch, outs):
                    b.result = o
            except Exception as e:
                if len(batch) == 1:
                    batch[0].error = e
                else:
                    for b in batch:  # one by one, so a bad request fails alone
                        try:
                            b.result = self.engine.generate([b.req])[0]
                        except Exception as e1:
                            b.error = e1
        for b in batch:
            if b.result is None and b.error is None:
                b.error = RuntimeError("engine returned no result")
            b.done.set()

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=30)


# -- the server ----------------------------------------------------------------------------------------------------------
class EngineServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to an engine and its processor. Use :func:`serve` to start one."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Any, processor: Any, model_name: str = "vigorl",
                 api_key: str | None = None, fail_first: int = 0, fail_status: int = 503, delay_s: float = 0.0,
                 batch_window_ms: float = 5.0, max_batch: int = 64, lock: threading.Lock | None = None,
                 default_max_tokens: int = 256, verbose: bool = False):
        self.engine = engine
        self.processor = processor
        self.tok = processor.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.fail_first = int(fail_first)
        self.fail_status = int(fail_status)
        self.delay_s = float(delay_s)
        self.default_max_tokens = int(default_max_tokens)
        self.verbose = verbose
        self.image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
        self.image_token_id = self.tok.convert_tokens_to_ids(self.image_token)
        self.created = int(time.time())
        self._stats_lock = threading.Lock()
        self.stats = {"chat_requests": 0, "injected_failures": 0, "served": 0, "errors": 0, "batches": 0,
                      "max_batch_seen": 0, "in_flight": 0, "max_in_flight": 0}
        self.recent: deque[GenerationRequest] = deque(maxlen=64)  # the last requests handed to the engine
        self.batcher = _Batcher(engine, lock or threading.Lock(), batch_window_ms / 1000.0, max_batch,
                                on_batch=self._on_batch)
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall for seconds on a machine without DNS
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        """The base URL for an OpenAI client (``http://host:port/v1``)."""
        host = self.server_address[0]
        return f"http://{host}:{self.port}/v1"

    def bump(self, key: str, by: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += by

    def _on_batch(self, size: int) -> None:
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], size)

    def enter(self) -> None:
        """A chat request is being handled (counts ``in_flight`` and its peak ``max_in_flight``)."""
        with self._stats_lock:
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])

    def leave(self) -> None:
        with self._stats_lock:
            self.stats["in_flight"] -= 1

    def take_injected_failure(self) -> bool:
        with self._stats_lock:
            self.stats["chat_requests"] += 1
            if self.stats["injected_failures"] < self.fail_first:
                self.stats["injected_failures"] += 1
                return True
            return False

    def close(self) -> None:
        """Stop serving, close the socket and the batcher."""
        if self._thread is not None and self._thread.is_alive():
            self.shutdown()  # safe even before serve_forever starts: it then returns at once
        self.server_close()
        self.batcher.stop()

    # -- request building -------------------------------------------------------------------------------------------
    def build_request(self, body: dict) -> tuple[GenerationRequest, dict]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list")
        images: list[Image.Image] = []
        chat: list[dict] = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m:
                raise BadRequest("each message needs a 'role'")
            content = m.get("content")
            if content is None:
                content = ""
            if isinstance(content, str):
                chat.append({"role": m["role"], "content": content})
                continue
            if not isinstance(content, list):
                raise BadRequest("message content must be a string or a list of parts")
            parts = []
            for part in content:
                t = part.get("type") if isinstance(part, dict) else None
                if t == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif t == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    images.append(decode_data_url(url))
                    parts.append({"type": "image"})
                else:
                    raise BadRequest(f"unsupported content part type {t!r}")
            if all(p["type"] == "text" for p in parts):
                chat.append({"role": m["role"], "content": "".join(p["text"] for p in parts)})
            else:
                chat.append({"role": m["role"], "content": parts})
        agp = bool(body.get("add_generation_prompt", True))
        cont = bool(body.get("continue_final_message", False))
        if agp and cont:
            raise BadRequest("continue_final_message and add_generation_prompt cannot both be true")
        if cont and chat[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message")
        try:
            text = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=agp,
                                                      continue_final_message=cont)
        except Exception as e:
            raise BadRequest(f"chat template failed: {type(e).__name__}: {e}") from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != len(images):
            raise BadRequest(f"prompt has {ids.count(self.image_token_id)} image placeholders for {len(images)} "
                             "images (is an image token in the text?)")
        params = self._params(body)
        req = GenerationRequest(prompt_ids=ids, images=images, params=params, request_id=str(body.get("user") or ""))
        opts = {"return_token_ids": bool(body.get("return_token_ids", False)),
                "include_stop": bool(body.get("include_stop_str_in_output", False)),
                "skip_special": bool(body.get("skip_special_tokens", True)),
                "logprobs": bool(body.get("logprobs", False))}
        return req, opts

    def _params(self, body: dict) -> SamplingParams:
        def num(key, default, cast=float):
            v = body.get(key)
            if v is None:
                return default
            try:
                return cast(v)
            except (TypeError, ValueError):
                raise BadRequest(f"{key!r} must be a number") from None

        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(s for s in stop if s)
        else:
            raise BadRequest("'stop' must be a string or a list of strings")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        n = num("n", 1, int)
        if n < 1:
            raise BadRequest("'n' must be >= 1")
        top_k = num("top_k", 0, int)
        return SamplingParams(n=n, temperature=num("temperature", 1.0), top_p=num("top_p", 1.0),
                              top_k=max(0, top_k), max_new_tokens=max(1, int(max_tokens)),
                              repetition_penalty=num("repetition_penalty", 1.0), stop=stop,
                              seed=num("seed", None, int), logprobs=True)

    def render(self, req: GenerationRequest, comps: list[Completion], opts: dict) -> dict:
        choices = []
        n_out = 0
        for i, c in enumerate(comps):
            if c.finish_reason == "error":
                raise RuntimeError(c.error or "engine error")
            text = self.tok.decode(c.token_ids, skip_special_tokens=opts["skip_special"])
            stop_reason = None
            if c.finish_reason == "stop" and c.stop_reason not in (None, "eos"):
                stop_reason = c.stop_reason
                at = text.find(stop_reason)
                if at >= 0:
                    text = text[:at + len(stop_reason)] if opts["include_stop"] else text[:at]
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                      "finish_reason": c.finish_reason, "stop_reason": stop_reason, "logprobs": None}
            if opts["logprobs"] and c.logprobs is not None:
                content = []
                for t, lp in zip(c.token_ids, c.logprobs):
                    s = self.tok.decode([t], skip_special_tokens=False)
                    content.append({"token": s, "logprob": lp if math.isfinite(lp) else -9999.0,
                                    "bytes": list(s.encode("utf-8")), "top_logprobs": []})
                choice["logprobs"] = {"content": content}
            if opts["return_token_ids"]:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
            n_out += len(c.token_ids)
        out: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                               "created": int(time.time()), "model": self.model_name, "choices": choices,
                               "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n_out,
                                         "total_tokens": len(req.prompt_ids) + n_out}}
        if opts["return_token_ids"]:
            out["prompt_token_ids"] = list(req.prompt_ids)
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EngineServer

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": status},
                            "object": "error", "message": message, "type": kind, "code": status})

    def _authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._error(401, "invalid API key", "authentication_error")
        return False

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            if not self._authorized():
                return
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "created": self.server.created, "owned_by": "vigorl",
                                                         "root": self.server.model_name}]})
        else:
            self._error(404, f"no route {self.path}", "not_found_error")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found_error")
            return
        if not self._authorized():
            return
        self.server.enter()
        try:
            self._chat(raw)
        finally:
            self.server.leave()

    def _chat(self, raw: bytes) -> None:
        srv = self.server
        if srv.take_injected_failure():
            self._error(srv.fail_status, "injected failure", "server_error")
            return
        if srv.delay_s > 0:
            time.sleep(srv.delay_s)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            req, opts = srv.build_request(body)
        except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
            srv.bump("errors")
            self._error(400, str(e))
            return
        srv.recent.append(req)
        try:
            comps = srv.batcher.submit(req)
            payload = srv.render(req, comps, opts)
        except Exception as e:
            srv.bump("errors")
            self._error(500, f"{type(e).__name__}: {e}", "server_error")
            return
        srv.bump("served")
        self._send(200, payload)


def serve(engine: Any, processor: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "vigorl",
          **kw) -> tuple[EngineServer, threading.Thread]:
    """Start a server in a daemon thread (``port=0`` picks a free port: read ``server.port``/``server.url``).

    Extra keywords go to :class:`EngineServer` (``api_key``, ``fail_first``, ``fail_status``, ``delay_s``,
    ``batch_window_ms``, ``max_batch``, ``lock``, ``default_max_tokens``, ``verbose``). Stop with ``server.close()``.
    """
    server = EngineServer((host, port), engine, processor, model_name=model_name, **kw)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="vigorl-server",
                         daemon=True)
    server._thread = t
    t.start()
    return server, t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vigorl_cli.engines.server",
                                 description="OpenAI-compatible chat server over the HF engine.")
    ap.add_argument("--model", default="tiny-qwen2.5-vl", help="hub id, local folder, or a tiny-* name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    ap.add_argument("--api-key", default=os.environ.get("VIGORL_SERVER_API_KEY"))
    ap.add_argument("--batch-size", type=int, default=16, help="HF engine rows per generate call")
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--max-batch", type=int, default=64, help="requests per engine call")
    ap.add_argument("--default-max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--fail-first", type=int, default=int(os.environ.get("VIGORL_SERVER_FAIL_FIRST", "0")))
    ap.add_argument("--fail-status", type=int, default=503)
    ap.add_argument("--delay-s", type=float, default=float(os.environ.get("VIGORL_SERVER_DELAY_S", "0")))
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)

    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.models.load import load_model

    bundle = load_model(a.model, dtype=a.dtype, device=a.device)
    engine = HFEngine(bundle, batch_size=a.batch_size, seed=a.seed)
    server, thread = serve(engine, bundle.processor, a.host, a.port, model_name=a.served_model_name or a.model,
                           api_key=a.api_key, fail_first=a.fail_first, fail_status=a.fail_status, delay_s=a.delay_s,
                           batch_window_ms=a.batch_window_ms, max_batch=a.max_batch,
                           default_max_tokens=a.default_max_tokens, verbose=a.verbose)
    print(f"serving {server.model_name} at {server.url}", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        engine.close()


if __name__ == "__main__":
    main()
