"""OpenAI-compatible engine: a pool of chat-completion servers (vLLM ``serve``, or :mod:`vigorl_cli.engines.server`).

The reference (grounded-rl) drives its 72B teacher through one vLLM OpenAI server from 10 processes, one blocking
request at a time, re-encoding the full image as base64 PNG on every call. This engine is the async replacement:

* **Async and sync.** :meth:`OpenAIEngine.agenerate` is one request (``params.n`` completions) as a coroutine, so
  episodes run as independent tasks with no batch-wide barrier. :meth:`OpenAIEngine.generate` runs a list of
  requests concurrently on a private background event loop and returns their results in order (the sync
  :class:`~vigorl_cli.engines.base.Engine` protocol). Clients and semaphores are kept per event loop, so both
  styles can be mixed on one engine.
* **Load balancing.** One official ``openai.AsyncOpenAI`` client per base URL. Each request goes to the healthy
  endpoint with the fewest requests in flight (ties rotate); each endpoint admits at most ``concurrency`` requests
  at once (a semaphore per endpoint), the rest wait their turn client-side.
* **Retries and health.** Connection errors, timeouts, 5xx, 408 and 429 are retried ``max_retries`` times with
  exponential backoff and jitter (``Retry-After`` is honoured, capped); a retry goes to another healthy endpoint
  when there is one (then without waiting). An endpoint with ``unhealthy_after`` consecutive failures is skipped for
  ``cooldown_s`` seconds (unless every endpoint is down). When the retries are spent, or on a non-retryable error
  (400, 401, 404, 422, a malformed response, ...), the request returns ``n`` completions with
  ``finish_reason="error"`` and ``error`` set; it never raises for a transport or server failure, so a dead
  endpoint cannot kill a run. (A request without ``messages`` is a programming error and raises ``ValueError``.)
  ``timeout_s`` bounds each attempt, so a request takes at most about ``(max_retries + 1) * timeout_s`` plus the
  backoff (and any wait for a semaphore slot). A cancelled ``agenerate`` releases its slot.

**The message contract.** ``request.messages`` is the chat form built by the episode loop
(:mod:`vigorl_cli.agent.episode`): ``{"role", "content"}`` dicts whose content is a string or a list of parts:

* ``{"type": "text", "text": str}`` is sent as is;
* ``{"type": "image", "image": PIL.Image}`` becomes ``{"type": "image_url", "image_url": {"url": "data:..."}}``;
  ``{"type": "image"}`` with no ``image`` takes the next image of ``request.images`` (the k-th image part of the
  conversation is ``request.images[k]``); ``"image"`` may also be a ``data:``/``http(s):`` URL (sent as is) or a
  local file path (read and encoded);
* ``{"type": "image_url", ...}`` parts are sent as is.

Other message keys are dropped (only ``role``, ``content``, ``name``, ``tool_call_id``, ``tool_calls`` go out). A
final ``assistant`` message (the episode loop adds one, marked ``"prefix": True``, for a forced answer prefix) is
*continued*: ``continue_final_message=True, add_generation_prompt=False``; otherwise ``add_generation_prompt=True``
(the reference's setting).

**Images are encoded once.** The data URL of each image is cached in a bounded LRU (``image_cache_size`` entries and
``image_cache_mb`` MiB) keyed by ``request.image_keys[k]`` when the image is one of ``request.images`` with a key, and
by the object's identity otherwise (guarded by a weak reference, so a recycled ``id()`` cannot serve a stale
image). Concurrent requests for the same image share one encoding. PNG (lossless, ``png_compress_level`` 1 by
default: fast, somewhat larger) is the default; ``image_format="jpeg"`` with ``jpeg_quality`` trades exactness for
size. Encoding runs in a small thread pool, off the event loop. :attr:`OpenAIEngine.image_encodings` counts
encodings.

**What comes back.** ``Completion.text`` is the message content (with ``vllm_extras`` the stop string that ended the
turn is kept in the text, ``include_stop_str_in_output``, as the HF engine does; special tokens such as
``<|im_end|>`` are not in the text, vLLM's default). ``Completion.token_ids`` are the server-reported completion ids
(vLLM ``return_token_ids``, vLLM >= 0.10.2; this package's server) and ``[]`` when the server does not report them:
the episode loop then re-tokenizes the text (and marks the segment ``retokenized``). ``Completion.logprobs`` are the
per-token log-probs the server reports (``logprobs=True``; vLLM's default ``logprobs_mode`` reports raw model
log-probs, before temperature/penalties), ``None`` when absent or when their count disagrees with the token ids.
``finish_reason`` is ``"stop"``/``"length"``; ``stop_reason`` is the stop string, or ``"eos"`` when the server
reports none for a ``"stop"`` finish (vLLM: eos or a stop token id).

``vllm_extras=False`` sends only standard OpenAI fields (for servers that reject unknown ones): no top_k,
repetition_penalty, token ids or continuation flags.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import openai
from PIL import Image

from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

_MESSAGE_KEYS = ("role", "content", "name", "tool_call_id", "tool_calls")


# -- image encoding --------------------------------------------------------------------------------------------------
def encode_image(img: Image.Image, image_format: str = "png", jpeg_quality: int = 95,
                 png_compress_level: int = 1) -> str:
    """One PIL image → a ``data:`` URL (PNG keeps the pixels exactly; JPEG is smaller)."""
    buf = io.BytesIO()
    fmt = image_format.lower()
    if fmt in ("jpeg", "jpg"):
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=int(jpeg_quality))
        mime = "image/jpeg"
    elif fmt == "png":
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if "transparency" in img.info or img.mode.endswith("A") else "RGB")
        img.save(buf, format="PNG", compress_level=int(png_compress_level))
        mime = "image/png"
    else:
        raise ValueError(f"image_format must be png or jpeg, not {image_format!r}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


@dataclass
class _CacheEntry:
    url: str
    ref: Any = None  # weakref (or the object itself when it cannot be weakly referenced) for identity keys


class _ImageCache:
    """Bounded LRU of data URLs with single-flight encoding (thread-safe; shared by every event loop)."""

    def __init__(self, encode, max_entries: int, max_bytes: int, workers: int):
        self._encode = encode
        self.max_entries = max(1, int(max_entries))
        self.max_bytes = max(1, int(max_bytes))
        self._lru: OrderedDict[Any, _CacheEntry] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[Any, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vigorl-img-encode")
        self.encodings = 0
        self.hits = 0

    @staticmethod
    def _ref(obj):
        try:
            return weakref.ref(obj)
        except TypeError:
            return lambda o=obj: o  # keeps it alive while cached: its id cannot be recycled meanwhile

    def _lookup(self, key, obj) -> str | None:
        e = self._lru.get(key)
        if e is None:
            return None
        if e.ref is not None and e.ref() is not obj:  # an identity key whose object died and whose id was reused
            self._drop(key)
            return None
        self._lru.move_to_end(key)
        return e.url

    def _drop(self, key) -> None:
        e = self._lru.pop(key, None)
        if e is not None:
            self._bytes -= len(e.url)

    def _store(self, key, url: str, obj, identity: bool) -> None:
        with self._lock:
            self._drop(key)
            self._lru[key] = _CacheEntry(url, self._ref(obj) if identity else None)
            self._bytes += len(url)
            while len(self._lru) > 1 and (len(self._lru) > self.max_entries or self._bytes > self.max_bytes):
                self._drop(next(iter(self._lru)))
            self._inflight.pop(key, None)

    def _run(self, key, img, identity: bool) -> str:
        url = self._encode(img)
        with self._lock:
            self.encodings += 1
        self._store(key, url, img, identity)
        return url

    async def get(self, key, img, identity: bool) -> str:
        with self._lock:
            url = self._lookup(key, img)
            if url is not None:
                self.hits += 1
                return url
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._pool.submit(self._run, key, img, identity)
                self._inflight[key] = fut
                fut.add_done_callback(lambda f, k=key: self._forget(k, f))
            else:
                self.hits += 1
        return await asyncio.wrap_future(fut)

    def _forget(self, key, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._bytes = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- endpoints ---------------------------------------------------------------------------------------------------------
@dataclass
class _Endpoint:
    index: int
    base_url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    requests: int = 0
    successes: int = 0
    failures: int = 0

    def healthy(self, now: float) -> bool:
        return self.down_until <= now


class _LoopState:
    """What is bound to one event loop: the clients (their connection pools) and the per-endpoint semaphores."""

    def __init__(self, engine: OpenAIEngine):
        self.clients = [openai.AsyncOpenAI(base_url=ep.base_url, api_key=engine.api_key, timeout=engine.timeout_s,
                                           max_retries=0) for ep in engine.endpoints]
        self.sems = [asyncio.Semaphore(engine.concurrency) for _ in engine.endpoints]

    async def close(self) -> None:
        for c in self.clients:
            try:
                await c.close()
            except Exception as e:  # closing must not fail a shutdown
                log.debug("closing a client failed: %s", _err_text(e))


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None, counts_against_endpoint: bool = True):
        super().__init__(msg)
        self.retry_after = retry_after
        self.counts = counts_against_endpoint


def _normalize_url(url: str) -> str:
    url = url.rstrip("/")
    scheme_sep = url.find("://")
    if "/" not in url[scheme_sep + 3 if scheme_sep >= 0 else 0:]:
        url += "/v1"  # a bare host:port means the OpenAI routes under /v1
    return url


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        v = exc.response.headers.get("retry-after")
        return float(v) if v is not None else None
    except Exception:
        return None


def _err_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class OpenAIEngine:
    """A pool of OpenAI-compatible chat servers behind the :class:`AsyncEngine` and :class:`Engine` protocols."""

    name = "openai"

    def __init__(self, base_urls: list[str] | str, model: str, api_key: str | None = None, concurrency: int = 64,
                 timeout_s: float = 120, max_retries: int = 3, *, image_format: str = "png", jpeg_quality: int = 95,
                 png_compress_level: int = 1, image_cache_size: int = 512, image_cache_mb: float = 1024,
                 vllm_extras: bool = True, backoff_base_s: float = 0.5, backoff_max_s: float = 8.0,
                 unhealthy_after: int = 3, cooldown_s: float = 30.0, encode_workers: int = 4):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("OpenAIEngine needs at least one base URL")
        if image_format.lower() not in ("png", "jpeg", "jpg"):
            raise ValueError(f"image_format must be png or jpeg, not {image_format!r}")
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = max(1, int(concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.vllm_extras = vllm_extras
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.unhealthy_after = max(1, int(unhealthy_after))
        self.cooldown_s = float(cooldown_s)
        self.endpoints = [_Endpoint(i, _normalize_url(u)) for i, u in enumerate(urls)]
        self._fmt = {"image_format": image_format, "jpeg_quality": jpeg_quality,
                     "png_compress_level": png_compress_level}
        self._images = _ImageCache(lambda img: encode_image(img, **self._fmt), image_cache_size,
                                   int(image_cache_mb * 2 ** 20), encode_workers)
        self._lock = threading.Lock()
        self._rr = 0
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._bg_loop: asyncio.AbstractEventLoop | None = None
        self._bg_thread: threading.Thread | None = None
        self._closed = False

    # -- public: async --------------------------------------------------------------------------------------------
    async def agenerate(self, request: GenerationRequest) -> list[Completion]:
        """``request.params.n`` completions; error completions (never an exception) when the pool fails."""
        if self._closed:
            raise RuntimeError("OpenAIEngine is closed")
        if request.messages is None:
            raise ValueError(f"OpenAIEngine needs request.messages (chat form); request {request.request_id!r} "
                             "has only prompt ids")
        n = max(1, request.params.n)
        try:
            messages = await self._wire_messages(request)
        except Exception as e:  # an unreadable image path etc.
            return self._errors(n, f"cannot build the request: {_err_text(e)}")
        kwargs = self._kwargs(request.params, messages)
        state = self._state()
        last_err = "no attempt made"
        failed: int | None = None
        retry_after: float | None = None
        for attempt in range(self.max_retries + 1):
            ep = self._pick(exclude=failed)
            try:
                if attempt > 0 and (failed is None or ep.index == failed):  # no other endpoint to go to: wait
                    await asyncio.sleep(self._backoff(attempt - 1, retry_after))
                resp = await self._send(state, ep, kwargs)
            except _Retryable as e:
                last_err, failed, retry_after = f"{ep.base_url}: {e}", ep.index, e.retry_after
                self._failed(ep, counts=e.counts)
                log.debug("attempt %d of %s failed: %s", attempt + 1, request.request_id, last_err)
                continue
            except Exception as e:  # not worth retrying: a 4xx, or a response we cannot read
                self._done(ep)
                return self._errors(n, f"{ep.base_url}: {_err_text(e)}")
            except BaseException:  # cancelled: the request is no longer in flight
                self._done(ep)
                raise
            self._succeeded(ep)
            try:
                return self._parse(resp, n, request.params)
            except Exception as e:
                return self._errors(n, f"{ep.base_url}: unreadable response: {_err_text(e)}")
        log.warning("request %s failed after %d attempts: %s", request.request_id or "?", self.max_retries + 1,
                    last_err)
        return self._errors(n, f"failed after {self.max_retries + 1} attempts: {last_err}")

    async def aclose(self) -> None:
        """Close this loop's clients, and the background loop of :meth:`generate` if one was started."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.pop(loop, None)
        if state is not None:
            await state.close()
        if self._bg_loop is not None and loop is not self._bg_loop:
            await asyncio.to_thread(self.close)
        elif self._bg_loop is None:
            self._closed = True
            self._images.close()

    # -- public: sync -------------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """All requests concurrently (bounded by the per-endpoint semaphores); results in request order."""
        if self._closed:
            raise RuntimeError("OpenAIEngine is closed")
        for r in requests:
            if r.messages is None:
                raise ValueError(f"OpenAIEngine needs request.messages (chat form); request {r.request_id!r} "
                                 "has only prompt ids")
        if not requests:
            return []

        async def run():
            return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))

        return asyncio.run_coroutine_threadsafe(run(), self._background_loop()).result()

    def close(self) -> None:
        """Stop the background loop (closing its clients) and the encoder pool. Idempotent."""
        loop, thread = self._bg_loop, self._bg_thread
        if loop is not None and thread is not None and thread.is_alive():
            with self._lock:
                state = self._loops.pop(loop, None)
            if state is not None:
                try:
                    asyncio.run_coroutine_threadsafe(state.close(), loop).result(timeout=10)
                except Exception as e:
                    log.debug("closing the background clients failed: %s", _err_text(e))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
        self._bg_loop = self._bg_thread = None
        self._closed = True
        self._images.close()

    # -- public: introspection ------------------------------------------------------------------------------------
    @property
    def image_encodings(self) -> int:
        """How many images were encoded so far (cache misses)."""
        return self._images.encodings

    def stats(self) -> dict:
        now = time.monotonic()
        with self._lock:
            eps = [{"base_url": e.base_url, "in_flight": e.in_flight, "requests": e.requests,
                    "successes": e.successes, "failures": e.failures, "healthy": e.healthy(now)}
                   for e in self.endpoints]
        return {"endpoints": eps, "image_encodings": self._images.encodings, "image_cache_hits": self._images.hits,
                "image_cache_entries": len(self._images._lru)}

    # -- internals: routing -------------------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        with self._lock:
            st = self._loops.get(loop)
            if st is None:
                st = self._loops[loop] = _LoopState(self)
            return st

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._bg_loop is None:
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="vigorl-openai-engine", daemon=True)
                t.start()
                self._bg_loop, self._bg_thread = loop, t
            return self._bg_loop

    def _pick(self, exclude: int | None = None) -> _Endpoint:
        """The healthy endpoint with the fewest requests in flight (ties rotate); counts the request in flight."""
        now = time.monotonic()
        with self._lock:
            eps = self.endpoints
            cands = [e for e in eps if e.healthy(now) and e.index != exclude]
            if not cands:
                cands = [e for e in eps if e.healthy(now)]
            if not cands:  # everything is cooling down: try the one that recovers first
                cands = [min(eps, key=lambda e: e.down_until)]
            n = len(eps)
            ep = min(cands, key=lambda e: (e.in_flight, (e.index - self._rr) % n))
            self._rr = (self._rr + 1) % n
            ep.in_flight += 1
            ep.requests += 1
            return ep

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** retry))
        d = d * (0.5 + 0.5 * random.random())  # jitter: spread the retries of a burst
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max_s))
        return d

    def _done(self, ep: _Endpoint) -> None:
        with self._lock:
            ep.in_flight -= 1

    def _succeeded(self, ep: _Endpoint) -> None:
        with self._lock:
            ep.in_flight -= 1
            ep.successes += 1
            ep.consecutive_failures = 0
            ep.down_until = 0.0

    def _failed(self, ep: _Endpoint, counts: bool = True) -> None:
        with self._lock:
            ep.in_flight -= 1
            ep.failures += 1
            if not counts:
                return
            ep.consecutive_failures += 1
            if ep.consecutive_failures >= self.unhealthy_after:
                if ep.healthy(time.monotonic()):
                    log.warning("endpoint %s marked unhealthy for %.0f s after %d consecutive failures",
                                ep.base_url, self.cooldown_s, ep.consecutive_failures)
                ep.down_until = time.monotonic() + self.cooldown_s

    async def _send(self, state: _LoopState, ep: _Endpoint, kwargs: dict):
        async with state.sems[ep.index]:
            try:
                return await state.clients[ep.index].chat.completions.create(**kwargs)
            except openai.APITimeoutError as e:
                raise _Retryable(f"timeout after {self.timeout_s:g} s ({_err_text(e)})") from None
            except openai.APIConnectionError as e:
                raise _Retryable(_err_text(e)) from None
            except openai.APIStatusError as e:
                if e.status_code == 429:
                    raise _Retryable(f"HTTP 429: {_err_text(e)}", _retry_after(e), counts_against_endpoint=False)
                if e.status_code >= 500 or e.status_code == 408:
                    raise _Retryable(f"HTTP {e.status_code}: {_err_text(e)}", _retry_after(e)) from None
                raise

    # -- internals: request and response ----------------------------------------------------------------------------
    async def _wire_messages(self, request: GenerationRequest) -> list[dict]:
        images = list(request.images or [])
        keys = list(request.image_keys or [])
        key_of = {id(im): keys[i] for i, im in enumerate(images) if i < len(keys) and keys[i] is not None}
        k = 0
        out = []
        for m in request.messages or []:
            msg = {key: m[key] for key in _MESSAGE_KEYS if key in m}
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image":
                        img = part.get("image")
                        if img is None:
                            if k >= len(images):
                                raise ValueError(f"image part {k} has no image and request.images has {len(images)}")
                            img = images[k]
                        k += 1
                        parts.append({"type": "image_url", "image_url": {"url": await self._url(img, key_of)}})
                    elif isinstance(part, dict) and part.get("type") == "image_url":
                        parts.append({"type": "image_url", "image_url": part["image_url"]})
                        k += 1
                    else:
                        parts.append(part)
                msg["content"] = parts
            out.append(msg)
        return out

    async def _url(self, img: Any, key_of: dict) -> str:
        if isinstance(img, str):
            if img.startswith(("data:", "http://", "https://")):
                return img
            return await self._images.get(("path", os.path.abspath(img)), img, identity=False)
        if isinstance(img, os.PathLike):
            return await self._url(os.fspath(img), key_of)
        if not isinstance(img, Image.Image):
            raise TypeError(f"an image part holds {type(img).__name__}, expected a PIL image, URL or path")
        key = key_of.get(id(img))
        if key is not None:
            return await self._images.get(("key", key), img, identity=False)
        return await self._images.get(("id", id(img)), img, identity=True)

    def _kwargs(self, p: SamplingParams, messages: list[dict]) -> dict:
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "n": max(1, p.n),
                              "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_new_tokens}
        if p.stop:
            kw["stop"] = list(p.stop)
        if p.seed is not None:
            kw["seed"] = int(p.seed)
        if p.logprobs:
            kw["logprobs"] = True
        if self.vllm_extras:
            cont = bool(messages) and messages[-1].get("role") == "assistant"
            extra: dict[str, Any] = {"add_generation_prompt": not cont, "continue_final_message": cont,
                                     "return_token_ids": True}
            if p.stop:
                extra["include_stop_str_in_output"] = True
            if p.top_k and p.top_k > 0:
                extra["top_k"] = int(p.top_k)
            if p.repetition_penalty != 1.0:
                extra["repetition_penalty"] = float(p.repetition_penalty)
            kw["extra_body"] = extra
        return kw

    @staticmethod
    def _extra(obj: Any, name: str) -> Any:
        v = getattr(obj, name, None)
        if v is None:
            v = (getattr(obj, "model_extra", None) or {}).get(name)
        return v

    def _parse(self, resp: Any, n: int, params: SamplingParams) -> list[Completion]:
        choices = sorted(resp.choices or [], key=lambda c: c.index or 0)
        out: list[Completion] = []
        for ch in choices[:n]:
            text = (ch.message.content if ch.message is not None else None) or ""
            ids = self._extra(ch, "token_ids") or []
            ids = [int(t) for t in ids]
            lps = None
            content = getattr(ch.logprobs, "content", None) if ch.logprobs is not None else None
            if params.logprobs and content:
                lps = [float(t.logprob) for t in content]
                if ids and len(lps) != len(ids):
                    lps = None
            fr = ch.finish_reason
            if fr in ("stop", "tool_calls", "function_call"):
                sr = self._extra(ch, "stop_reason")
                out.append(Completion(ids, text, lps, "stop", sr if isinstance(sr, str) else "eos"))
            elif fr == "length":
                out.append(Completion(ids, text, lps, "length", None))
            else:
                out.append(Completion(ids, text, lps, "error", None, error=f"server finish_reason {fr!r}"))
        if len(out) < n:
            out += self._errors(n - len(out), f"server returned {len(choices)} choices for n={n}")
        return out

    @staticmethod
    def _errors(n: int, msg: str) -> list[Completion]:
        return [Completion([], "", None, "error", None, error=msg) for _ in range(n)]

    def __enter__(self) -> OpenAIEngine:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> OpenAIEngine:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
