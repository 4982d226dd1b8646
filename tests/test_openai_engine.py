"""OpenAIEngine against real HTTP servers on localhost (the stdlib server over the HF engine on the tiny model).

No client mocks: every test starts one or more :mod:`vigorl_cli.engines.server` instances on free ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request

import pytest
from PIL import Image

from vigorl_cli.engines.base import AsyncEngine, Engine, GenerationRequest, SamplingParams
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.engines.openai import OpenAIEngine, _ImageCache, encode_image
from vigorl_cli.engines.server import serve

MODEL = "tiny"
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 20}


@pytest.fixture(scope="module")
def hf(tiny_bundle):
    return HFEngine(tiny_bundle, batch_size=16)


@pytest.fixture(scope="module")
def engine_lock():
    return threading.Lock()  # servers over one model must not run it concurrently


@pytest.fixture
def start(hf, tiny_bundle, engine_lock):
    servers = []

    def _start(**kw):
        srv, _ = serve(hf, tiny_bundle.processor, model_name=MODEL, lock=engine_lock, **kw)
        servers.append(srv)
        return srv

    yield _start
    for s in servers:
        s.close()


def dead_url() -> str:
    """A localhost port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def img(color, size=(64, 48)):
    return Image.new("RGB", size, color)


def noisy(seed, size=(56, 56)):
    import random

    rnd = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(size[0] * size[1])])
    return im


def request(images, text="What is shown?", n=1, seed=7, max_new=10, keys=None, placeholder_from=None, **params):
    """A chat request the way the episode loop builds one: PIL images inside the messages."""
    parts = []
    for i, im in enumerate(images):
        parts.append({"type": "image"} if placeholder_from is not None and i >= placeholder_from
                     else {"type": "image", "image": im})
    parts.append({"type": "text", "text": text})
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": parts}]
    return GenerationRequest(prompt_ids=[], images=list(images), messages=msgs, image_keys=keys,
                             params=SamplingParams(n=n, seed=seed, max_new_tokens=max_new, **params))


def direct(hf, processor, req):
    """What the HF engine samples for the same templated prompt, without HTTP."""
    chat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             [{"type": "image"} if c["type"] == "image" else c for c in m["content"]]} for m in req.messages]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids, hf.generate([GenerationRequest(prompt_ids=ids, images=req.images, params=req.params)])[0]


def ok(c):
    return c.finish_reason in ("stop", "length") and c.error is None and c.token_ids


# -- generation ------------------------------------------------------------------------------------------------------
def test_protocols():
    e = OpenAIEngine(["http://127.0.0.1:1"], MODEL)
    assert isinstance(e, AsyncEngine) and isinstance(e, Engine)
    assert e.endpoints[0].base_url == "http://127.0.0.1:1/v1"  # a bare host:port gets /v1
    e.close()


def test_one_image_async_is_token_exact(start, hf, tiny_bundle):
    srv = start()
    req = request([noisy(1)], seed=11, max_new=12)

    async def go():
        eng = OpenAIEngine([srv.url], MODEL, **FAST)
        try:
            return await eng.agenerate(req)
        finally:
            await eng.aclose()

    (c,) = asyncio.run(go())
    ids, (ref,) = direct(hf, tiny_bundle.processor, req)
    assert srv.recent[-1].prompt_ids == ids  # the server templated the same prompt
    assert ok(c)
    assert c.token_ids == ref.token_ids  # PNG is lossless and seeds are per request: the same sample
    assert c.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert c.text == tiny_bundle.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    assert c.finish_reason == ref.finish_reason


def test_two_images_sync_with_placeholder_part(start, hf, tiny_bundle):
    srv = start()
    a, b = noisy(2), noisy(3, (84, 56))
    req = request([a, b], seed=5, max_new=8, placeholder_from=1)  # 2nd image part is a bare {"type": "image"}
    eng = OpenAIEngine([srv.url], MODEL, **FAST)
    try:
        (out,) = eng.generate([req])
    finally:
        eng.close()
    seen = srv.recent[-1]
    assert len(seen.images) == 2
    assert seen.prompt_ids.count(tiny_bundle.config.image_token_id) == 2
    assert [im.tobytes() for im in seen.images] == [a.tobytes(), b.tobytes()]  # exact pixels, in order
    _, ref = direct(hf, tiny_bundle.processor, req)
    assert ok(out[0]) and out[0].token_ids == ref[0].token_ids


def test_sync_generate_keeps_order_and_n(start):
    srv = start(batch_window_ms=50)
    reqs = [request([img((i * 40, 10, 10))], n=i + 1, seed=100 + i, max_new=6) for i in range(3)]
    with OpenAIEngine([srv.url], MODEL, **FAST) as eng:
        outs = eng.generate(reqs)
    assert [len(o) for o in outs] == [1, 2, 3]
    assert all(ok(c) and len(c.logprobs) == len(c.token_ids) for o in outs for c in o)
    assert outs[1][0].token_ids != outs[1][1].token_ids  # n=2: two different draws
    assert srv.stats["max_batch_seen"] >= 2  # concurrent requests were micro-batched


def test_stop_strings(start, tiny_bundle):
    srv = start()
    tok = tiny_bundle.tokenizer
    with OpenAIEngine([srv.url], MODEL, **FAST) as eng:
        for seed in range(20):
            (full,) = eng.generate([request([img((9, 9, 200))], seed=seed, max_new=16)])[0]
            pieces = [tok.decode([t]) for t in full.token_ids[1:-1]]
            stop = next((p for p in pieces if p.isascii() and p.isprintable() and len(p.strip()) >= 2), None)
            if stop is not None:
                break
        assert stop is not None, "no usable stop string in 20 samples"
        (c,) = eng.generate([request([img((9, 9, 200))], seed=seed, max_new=16, stop=(stop,))])[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text.endswith(stop)  # kept in the text (include_stop_str_in_output), as the HF engine does
    assert c.token_ids == full.token_ids[:len(c.token_ids)] and len(c.token_ids) < len(full.token_ids)


def test_continues_a_final_assistant_message(start, tiny_bundle):
    srv = start()
    req = request([img((1, 2, 3))], max_new=4)
    req.messages.append({"role": "assistant", "content": "<think> Based on", "prefix": True})
    with OpenAIEngine([srv.url], MODEL, **FAST) as eng:
        (c,) = eng.generate([req])[0]
    assert ok(c)
    prompt = tiny_bundle.tokenizer.decode(srv.recent[-1].prompt_ids)
    assert prompt.endswith("<|im_start|>assistant\n<think> Based on")  # continued, not closed


def test_standard_fields_only_gives_text_without_ids(start):
    srv = start()
    with OpenAIEngine([srv.url], MODEL, vllm_extras=False, **FAST) as eng:
        (c,) = eng.generate([request([img((5, 5, 5))], max_new=5)])[0]
    assert c.finish_reason in ("stop", "length") and c.token_ids == [] and c.logprobs  # documented fallback


# -- pool behaviour --------------------------------------------------------------------------------------------------
def test_two_endpoints_share_the_load(start):
    s1, s2 = start(), start()
    reqs = [request([img((i, 0, 0))], seed=i, max_new=4) for i in range(12)]

    async def go():
        eng = OpenAIEngine([s1.url, s2.url], MODEL, concurrency=2, **FAST)
        try:
            return await asyncio.gather(*(eng.agenerate(r) for r in reqs)), eng.stats()
        finally:
            await eng.aclose()

    outs, stats = asyncio.run(go())
    assert all(ok(o[0]) for o in outs)
    assert s1.stats["served"] > 0 and s2.stats["served"] > 0
    assert s1.stats["served"] + s2.stats["served"] == 12
    assert all(e["successes"] > 0 and e["in_flight"] == 0 for e in stats["endpoints"])


@pytest.mark.parametrize("k", [1, 3])
def test_concurrency_limit_caps_requests_in_flight(start, k):
    """The server holds every request 0.25 s and records its peak of concurrent requests: with ``concurrency=k``
    the peak reaches k (enough requests are queued) and never exceeds it."""
    srv = start(delay_s=0.25)
    reqs = [request([img((i, 5, 5))], seed=i, max_new=2) for i in range(3 * k + 2)]

    async def go():
        eng = OpenAIEngine([srv.url], MODEL, concurrency=k, **FAST)
        try:
            return await asyncio.gather(*(eng.agenerate(r) for r in reqs))
        finally:
            await eng.aclose()

    outs = asyncio.run(go())
    assert all(ok(o[0]) for o in outs)
    assert srv.stats["max_in_flight"] == k and srv.stats["in_flight"] == 0
    assert srv.stats["served"] == len(reqs)


def test_retries_succeed_after_injected_503s(start):
    srv = start(fail_first=2)
    with OpenAIEngine([srv.url], MODEL, max_retries=3, **FAST) as eng:
        (c,) = eng.generate([request([img((0, 9, 0))], max_new=4)])[0]
        st = eng.stats()["endpoints"][0]
    assert ok(c)
    assert srv.stats["injected_failures"] == 2 and srv.stats["chat_requests"] == 3
    assert st["failures"] == 2 and st["successes"] == 1


def test_retries_exhausted_give_error_completions(start):
    srv = start(fail_first=100)
    with OpenAIEngine([srv.url], MODEL, max_retries=2, **FAST) as eng:
        out = eng.generate([request([img((0, 9, 9))], n=2, max_new=4)])[0]
    assert len(out) == 2 and all(c.finish_reason == "error" and "503" in c.error for c in out)
    assert srv.stats["chat_requests"] == 3  # 1 + max_retries


def test_client_errors_are_not_retried(start):
    srv = start()
    req = request([img((3, 3, 3))])
    req.messages[1]["content"].insert(0, {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}})
    with OpenAIEngine([srv.url], MODEL, **FAST) as eng:
        (c,) = eng.generate([req])[0]
    assert c.finish_reason == "error" and "400" in c.error
    assert srv.stats["chat_requests"] == 1


def test_dead_endpoint_alone_gives_errors_not_exceptions():
    t0 = time.monotonic()
    with OpenAIEngine([dead_url()], MODEL, max_retries=2, **FAST) as eng:
        out = eng.generate([request([img((1, 1, 1))], n=2)])[0]
        st = eng.stats()["endpoints"][0]
    assert [c.finish_reason for c in out] == ["error", "error"]
    assert "Connection" in out[0].error and "3 attempts" in out[0].error
    assert st["failures"] == 3 and not st["healthy"]  # 3 consecutive failures: cooling down
    assert time.monotonic() - t0 < 5


def test_dead_endpoint_is_routed_around(start):
    srv = start()
    reqs = [request([img((i, 2, 2))], seed=i, max_new=4) for i in range(8)]
    with OpenAIEngine([dead_url(), srv.url], MODEL, max_retries=2, unhealthy_after=1, concurrency=4, **FAST) as eng:
        outs = eng.generate(reqs)
        dead, live = eng.stats()["endpoints"]
    assert all(ok(o[0]) for o in outs)  # every request that hit the dead port was retried on the live one
    assert srv.stats["served"] == 8 and live["successes"] == 8
    assert dead["failures"] >= 1 and not dead["healthy"]


def test_timeouts_are_respected(start):
    srv = start(delay_s=2.0)
    t0 = time.monotonic()
    with OpenAIEngine([srv.url], MODEL, max_retries=1, backoff_base_s=0.01, timeout_s=0.3) as eng:
        (c,) = eng.generate([request([img((7, 7, 7))], max_new=4)])[0]
    took = time.monotonic() - t0
    assert c.finish_reason == "error" and "timeout" in c.error.lower()
    assert took < 1.5  # two attempts of 0.3 s, not the server's 2 s


def test_cancelled_request_releases_its_slot(start):
    srv = start(delay_s=1.0)

    async def go():
        eng = OpenAIEngine([srv.url], MODEL, concurrency=1, **FAST)
        try:
            task = asyncio.create_task(eng.agenerate(request([img((4, 4, 4))], max_new=2)))
            await asyncio.sleep(0.2)
            assert eng.stats()["endpoints"][0]["in_flight"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return eng.stats()["endpoints"][0]
        finally:
            await eng.aclose()

    st = asyncio.run(go())
    assert st["in_flight"] == 0 and st["failures"] == 0


# -- image encoding ------------------------------------------------------------------------------------------------
def test_each_image_is_encoded_once(start):
    srv = start(batch_window_ms=20)
    full, crop = noisy(4), noisy(5, (28, 28))
    keys = ["s1/full", "s1/crop-1"]

    async def go():
        eng = OpenAIEngine([srv.url], MODEL, concurrency=8, **FAST)
        try:
            outs = await asyncio.gather(*(eng.agenerate(request([full, crop], keys=keys, seed=i, max_new=2))
                                          for i in range(16)))
            assert all(ok(o[0]) for o in outs)
            assert eng.image_encodings == 2  # 16 concurrent sends, one encoding per image
            # the same key on a new object (the episode loop rebuilds its messages each turn): still cached
            await eng.agenerate(request([full.copy(), crop.copy()], keys=keys, max_new=2))
            assert eng.image_encodings == 2
            # no keys: cached by object identity
            other = noisy(6)
            for _ in range(4):
                await eng.agenerate(request([other], max_new=2))
            assert eng.image_encodings == 3
            await eng.agenerate(request([noisy(6)], max_new=2))  # equal pixels, another object
            assert eng.image_encodings == 4
        finally:
            await eng.aclose()

    asyncio.run(go())
    assert srv.stats["served"] == 22


def test_image_cache_identity_guard_and_bounds():
    n = {"enc": 0}

    def enc(im):
        n["enc"] += 1
        return encode_image(im)

    async def go():
        cache = _ImageCache(enc, max_entries=2, max_bytes=10 ** 9, workers=1)
        a = noisy(1)
        ua = await cache.get(("id", 1), a, identity=True)
        assert await cache.get(("id", 1), a, identity=True) == ua and n["enc"] == 1
        b = noisy(2)  # pretend b got a's recycled id: the weak reference tells them apart
        del a
        ub = await cache.get(("id", 1), b, identity=True)
        assert n["enc"] == 2 and ub != ua
        for i in range(3):
            await cache.get(("key", i), noisy(10 + i), identity=False)
        assert len(cache._lru) == 2  # bounded
        cache.close()

    asyncio.run(go())
    jpeg = encode_image(noisy(3), image_format="jpeg", jpeg_quality=80)
    assert jpeg.startswith("data:image/jpeg;base64,")


def test_server_routes(start):
    srv = start(api_key="secret")
    req = urllib.request.Request(srv.url + "/models", headers={"Authorization": "Bearer secret"})
    models = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert models["data"][0]["id"] == MODEL
    health = urllib.request.urlopen(srv.url.removesuffix("/v1") + "/health", timeout=5)
    assert health.status == 200
    with OpenAIEngine([srv.url], MODEL, api_key="wrong", **FAST) as eng:
        (c,) = eng.generate([request([img((2, 2, 2))], max_new=2)])[0]
    assert c.finish_reason == "error" and "401" in c.error
    with OpenAIEngine([srv.url], MODEL, api_key="secret", **FAST) as eng:
        (c,) = eng.generate([request([img((2, 2, 2))], max_new=2)])[0]
    assert ok(c)
