"""HF engine: seeded sampling independent of batching, raw log-probs, stop strings, n samples, vision tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vigorl_cli.engines.base import GenerationRequest, SamplingParams, derive_seed
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.models.load import mm_token_type_ids, vision_special_ids


def _req(bundle, text, img, **kw):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = bundle.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, [img], SamplingParams(**kw))


IM1 = Image.new("RGB", (200, 120), (255, 0, 0))
IM2 = Image.new("RGB", (80, 300), (0, 0, 255))


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch(tiny_bundle):
    eng = HFEngine(tiny_bundle, batch_size=8)
    r1 = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=12)
    r2 = _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=2, max_new_tokens=12)
    alone = eng.generate([r1])[0][0]
    batched = eng.generate([r2, r1])[1][0]
    assert alone.token_ids == batched.token_ids
    assert eng.generate([_req(tiny_bundle, "What colour is it?", IM1, seed=3, max_new_tokens=12)])[0][0].token_ids \
        != alone.token_ids


def test_logprobs_are_raw_policy_logprobs(tiny_bundle):
    """The sampled tokens' log-probs equal a plain forward pass's log_softmax (temperature 1, no processors),
    even when sampling used temperature, top-p and suppression, and for a left-padded row."""
    eng = HFEngine(tiny_bundle, batch_size=8)
    r_short = _req(tiny_bundle, "x", IM1, seed=5, max_new_tokens=10, temperature=0.7, top_p=0.9)
    r_long = _req(tiny_bundle, "a much longer question that forces padding", IM2, seed=6, max_new_tokens=10,
                  temperature=0.7, top_p=0.9)
    for req, comp in zip([r_short, r_long], eng.generate([r_short, r_long])):
        c = comp[0]
        pv, grid = eng.encode_images(req.images)
        ids = torch.tensor([eng.expand(req.prompt_ids, grid) + c.token_ids])
        with torch.no_grad():
            out = tiny_bundle.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                                    image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids(ids, tiny_bundle.config))
        P = ids.shape[1] - len(c.token_ids)
        lp = torch.log_softmax(out.logits[0, P - 1:-1].float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])
        assert torch.allclose(lp.squeeze(-1), torch.tensor(c.logprobs), atol=1e-5)


def test_stop_strings_end_the_completion_inclusively(tiny_bundle):
    """The completion ends with the token that completes the stop string (a token may extend past it)."""
    eng = HFEngine(tiny_bundle)
    tok = tiny_bundle.tokenizer
    for seed in range(3):
        c = eng.generate([_req(tiny_bundle, "x", IM1, seed=seed, max_new_tokens=40, stop=("e",))])[0][0]
        before = tok.decode(c.token_ids[:-1], skip_special_tokens=False)
        if c.stop_reason == "e":
            assert c.finish_reason == "stop" and "e" in c.text and "e" not in before
        elif c.finish_reason == "length":
            assert "e" not in c.text and len(c.token_ids) == 40


def test_n_samples_get_distinct_derived_seeds_and_greedy_is_deterministic(tiny_bundle):
    eng = HFEngine(tiny_bundle)
    outs = eng.generate([_req(tiny_bundle, "x", IM1, seed=7, n=3, max_new_tokens=8)])[0]
    assert len(outs) == 3 and len({tuple(o.token_ids) for o in outs}) > 1
    g = eng.generate([_req(tiny_bundle, "x", IM1, n=2, temperature=0.0, max_new_tokens=8)])[0]
    assert g[0].token_ids == g[1].token_ids
    assert derive_seed(1, "a", 0) == derive_seed(1, "a", 0) != derive_seed(1, "a", 1)


def test_vision_special_tokens_are_never_sampled(tiny_bundle):
    eng = HFEngine(tiny_bundle)
    outs = eng.generate([_req(tiny_bundle, "x", IM1, seed=s, max_new_tokens=32, temperature=2.0) for s in range(4)])
    banned = set(vision_special_ids(tiny_bundle.tokenizer))
    assert all(not set(o[0].token_ids) & banned for o in outs)


def test_placeholder_count_mismatch_is_an_error(tiny_bundle):
    eng = HFEngine(tiny_bundle)
    req = _req(tiny_bundle, "x", IM1)
    import pytest

    with pytest.raises(ValueError, match="placeholders"):
        eng.expand(req.prompt_ids, torch.tensor([[1, 4, 4], [1, 4, 4]]))


def test_gumbel_noise_is_a_counter_based_stream_with_the_right_distribution():
    from vigorl_cli.engines.hf import gumbel_noise

    seeds = torch.tensor([1, 2, 1], dtype=torch.int64)
    g = gumbel_noise(seeds, 0, 1000)
    assert torch.equal(g[0], g[2]) and not torch.equal(g[0], g[1])  # same seed, same noise, whatever the batch
    assert not torch.equal(gumbel_noise(seeds[:1], 1, 1000)[0], g[0])  # a new step, new noise
    # Gumbel(0,1): mean = Euler–Mascheroni 0.5772, variance pi^2/6 = 1.645
    big = gumbel_noise(torch.arange(64, dtype=torch.int64), 0, 4096).flatten()
    assert abs(float(big.mean()) - 0.5772) < 0.02 and abs(float(big.var()) - 1.645) < 0.05
    # Gumbel-max picks index i with probability softmax(logits)_i
    logits = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    picks = (logits[None, :] + gumbel_noise(torch.arange(20000, dtype=torch.int64), 0, 3)).argmax(-1)
    freq = torch.bincount(picks, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.015)


def test_an_image_shown_to_many_rows_is_encoded_once_with_identical_results(tiny_bundle):
    """A GRPO group: 4 requests (n=2 each) about one image; the vision tower must see that image once, and the
    samples and log-probs must equal those of encoding it for every row."""
    eng = HFEngine(tiny_bundle, batch_size=16)
    reqs = []
    for seed in range(4):
        r = _req(tiny_bundle, "What colour is it?", IM1, seed=seed, n=2, max_new_tokens=10)
        r.image_keys = ["sample-1/full"]
        reqs.append(r)
    reqs.append(_req(tiny_bundle, "And this one?", IM2, seed=9, max_new_tokens=10))  # another image, no key
    seen = []
    visual = tiny_bundle.model.model.visual
    hook = visual.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    try:
        shared = eng.generate(reqs)
        eng.dedupe_images = False
        separate = eng.generate(reqs)
    finally:
        eng.dedupe_images = True
        hook.remove()
    pv1, _ = eng.encode_images([IM1])
    pv2, _ = eng.encode_images([IM2])
    assert seen[0] == pv1.shape[0] + pv2.shape[0]  # two distinct images encoded, not nine occurrences
    assert seen[1] == 8 * pv1.shape[0] + pv2.shape[0]
    for a, b in zip(shared, separate):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_static_cache_gives_the_dynamic_cache_tokens_and_logprobs(tiny_bundle):
    """engine.static_cache runs our decode loop (engines/static_decode.py: one CUDA graph per step on a GPU, the same
    step function eagerly on CPU): tokens and raw log-probs equal the dynamic cache's for left-padded rows of different
    prompt widths, across calls of different widths, with temperature / top-p / top-k / repetition penalty, greedy,
    stop strings, and a text-only request; the cache length is bucketed and a call of the same shape reuses its
    state."""
    dyn = HFEngine(tiny_bundle, batch_size=8)
    static = HFEngine(tiny_bundle, batch_size=8, static_cache=True)
    assert static._decoder is not None
    text_only = GenerationRequest(tiny_bundle.tokenizer("hello there, how", add_special_tokens=False)["input_ids"], [],
                                  SamplingParams(seed=3, max_new_tokens=24))
    for kw in (dict(temperature=1.0), dict(temperature=0.0),
               dict(temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.3), dict(temperature=1.0, stop=("e",))):
        reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=24, **kw),
                _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=2, max_new_tokens=24,
                     **kw)]
        for batch in (reqs, reqs[:1]):
            want, got = dyn.generate(batch), static.generate(batch)
            for w, g in zip(want, got, strict=True):
                assert g[0].token_ids == w[0].token_ids and g[0].finish_reason == w[0].finish_reason
                assert torch.allclose(torch.tensor(g[0].logprobs), torch.tensor(w[0].logprobs), atol=1e-5)
    assert static.generate([text_only])[0][0].token_ids == dyn.generate([text_only])[0][0].token_ids
    assert {k[1] for k in static._decoder.states} == {HFEngine.CACHE_BUCKET}
    n_states = len(static._decoder.states)
    static.generate([_req(tiny_bundle, "Same shape again?", IM1, seed=9, max_new_tokens=24, temperature=1.0)])
    assert len(static._decoder.states) == n_states  # (batch 1, 1024 slots, 24 tokens, sampling) was seen: reused


@pytest.mark.parametrize("name,attn", [("tiny-qwen2-vl", "sdpa"), ("tiny-qwen3-vl", "sdpa"),
                                       ("tiny-qwen2.5-vl", "eager")])
def test_static_decode_matches_generate_for_every_qwen_family_and_eager_attention(name, attn):
    """Qwen2-VL and Qwen3-VL positions come from their own get_rope_index; eager attention takes an additive mask.
    The same with share_prompts (a request of n=2: one prefill row written to two cache rows)."""
    from vigorl_cli.models.load import load_model

    bundle = load_model(name, attn_implementation=attn)
    dyn, static = HFEngine(bundle, batch_size=8), HFEngine(bundle, batch_size=8, static_cache=True)
    assert static._decoder is not None and static._decoder.additive_mask == (attn == "eager")
    reqs = [_req(bundle, "What colour is it?", IM1, seed=1, max_new_tokens=20),
            _req(bundle, "Where is the dog in this much longer question?", IM2, seed=2, max_new_tokens=20, n=2)]
    for share in (False, True):
        static.share_prompts = share
        for w, g in zip(dyn.generate(reqs), static.generate(reqs), strict=True):
            for a, b in zip(w, g, strict=True):
                assert b.token_ids == a.token_ids
                assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5)
    assert static.shared_tokens > 0


def test_static_decode_stops_early_once_every_row_finished(tiny_bundle):
    """The host looks every CHECK_EVERY steps: once every row has sampled an eos (or completed a stop string), the
    loop stops instead of decoding max_new_tokens; the completions are cut as with generate."""
    from vigorl_cli.engines.static_decode import StaticDecoder

    greedy = dict(temperature=0.0, max_new_tokens=60)
    probe = HFEngine(tiny_bundle).generate([_req(tiny_bundle, "x", IM1, **greedy)])[0][0].token_ids
    eos = probe[2]  # make the third greedy token an end token
    dyn, static = HFEngine(tiny_bundle), HFEngine(tiny_bundle, static_cache=True)
    dyn.eos_ids = static.eos_ids = [eos]
    steps = []
    orig = static._decoder.generate

    def spy(*a, **kw):
        toks, lps = orig(*a, **kw)
        steps.append(len(toks[0]))
        return toks, lps

    static._decoder.generate = spy
    got = static.generate([_req(tiny_bundle, "x", IM1, **greedy)])[0][0]
    assert got.token_ids == dyn.generate([_req(tiny_bundle, "x", IM1, **greedy)])[0][0].token_ids == probe[:3]
    assert got.stop_reason == "eos" and steps == [StaticDecoder.CHECK_EVERY]
    static.eos_ids = [-1]
    stop = static.generate([_req(tiny_bundle, "x", IM1, temperature=0.0, max_new_tokens=60,
                                 stop=(tiny_bundle.tokenizer.decode(probe[:2]),))])[0][0]
    assert stop.token_ids == probe[:2] and steps[-1] == StaticDecoder.CHECK_EVERY


def test_decode_attention_equals_hf_sdpa_without_repeating_the_cache(tiny_bundle):
    """The decode step's grouped-query attention (G query heads of one key/value head as G queries of one sdpa head)
    equals HF's sdpa (which repeats every key/value head G times under a mask) for a padded, partly written static
    cache, and the static decode loop routes the language model's attention through it (and back afterwards)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import vigorl_cli.engines.static_decode as sd

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 3, 8, 2, 40, 16
    q, k, v = (torch.randn(B, h, t, D, generator=g) for h, t in ((Hq, 1), (Hkv, L), (Hkv, L)))
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., :30] = True
    mask[1, ..., 5:22] = True  # left padding, then unwritten slots
    mask[2, ..., 12:13] = True
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = Hq // Hkv, True, False
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = sd._decode_attention(module, q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (B, 1, Hq, D)
    assert torch.allclose(got, want, atol=1e-6)

    calls = []
    orig = sd._decode_attention

    def spy(module, query, *a, **kw):
        calls.append(query.shape[2])
        return orig(module, query, *a, **kw)

    sd._register()
    from transformers import AttentionInterface

    before = tiny_bundle.model.config.text_config._attn_implementation  # sdpa (vigorl_sdpa if a trainer touched it)

    AttentionInterface.register(sd.DECODE_IMPL, spy)
    try:
        HFEngine(tiny_bundle, static_cache=True).generate([_req(tiny_bundle, "x", IM1, seed=1, max_new_tokens=5)])
    finally:
        AttentionInterface.register(sd.DECODE_IMPL, orig)
    layers = tiny_bundle.model.config.text_config.num_hidden_layers
    assert calls == [1] * (4 * layers)  # 4 decode steps (the prefill samples the first token) through every layer
    assert tiny_bundle.model.config.text_config._attn_implementation == before != sd.DECODE_IMPL


def test_requests_with_different_token_limits_share_a_batch_and_keep_their_own_samples(tiny_bundle):
    """One generate call over rows with limits 5, 17 and 9 (one batch, decoded to 17): each row is cut at its own
    limit and equals the same request run alone; with the static decode loop too."""
    for static in (False, True):
        eng = HFEngine(tiny_bundle, batch_size=8, static_cache=static)
        runs = []
        orig = eng._run

        def spy(requests, chunk, _orig=orig):
            runs.append(len(chunk))
            return _orig(requests, chunk)

        eng._run = spy
        reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=s, max_new_tokens=n, temperature=1.0)
                for s, n in ((1, 5), (2, 17), (3, 9))]
        together = eng.generate(reqs)
        assert runs == [3]
        for r, t in zip(reqs, together):
            alone = eng.generate([r])[0][0]
            assert t[0].token_ids == alone.token_ids and len(t[0].token_ids) <= r.params.max_new_tokens
            assert torch.allclose(torch.tensor(t[0].logprobs), torch.tensor(alone.logprobs), atol=1e-5)
        assert [len(t[0].token_ids) for t in together if t[0].finish_reason == "length"] == \
            [r.params.max_new_tokens for r, t in zip(reqs, together) if t[0].finish_reason == "length"]


def test_image_features_of_keyed_images_are_reused_across_calls_until_the_vision_weights_change(tiny_bundle):
    """A multi-turn episode shows its earlier images again at every turn: features of images named by a string key
    are kept from one call to the next, so the vision tower encodes only new images (here: none, then only the
    crop), with the samples of a fresh engine; an unkeyed image is encoded every time; an in-place change of the
    vision weights empties the cache."""
    import copy

    from vigorl_cli.models.load import ModelBundle

    model = copy.deepcopy(tiny_bundle.model)
    bundle = ModelBundle(model, tiny_bundle.processor, "x", "qwen2_5_vl")
    eng = HFEngine(bundle, batch_size=8)
    seen = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    pv1, _ = eng.encode_images([IM1])
    pv2, _ = eng.encode_images([IM2])

    def turn(keys, images, seed):
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": "Which?"}]}]
        prompt = bundle.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        r = GenerationRequest(bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"], images,
                              SamplingParams(seed=seed, max_new_tokens=6), image_keys=keys)
        return r

    try:
        t1 = turn(["s/full"], [IM1], 1)
        t2 = turn(["s/full", "s/crop-1"], [IM1, IM2], 2)
        a = eng.generate([t1])
        b = eng.generate([t1])  # same image again: nothing encoded
        c = eng.generate([t2])  # only the crop is new
        assert seen == [pv1.shape[0], pv2.shape[0]]
        fresh = HFEngine(ModelBundle(copy.deepcopy(model), tiny_bundle.processor, "x", "qwen2_5_vl"))
        assert a[0][0].token_ids == b[0][0].token_ids == fresh.generate([t1])[0][0].token_ids
        assert c[0][0].token_ids == fresh.generate([t2])[0][0].token_ids
        seen.clear()
        unkeyed = turn(None, [IM1], 3)
        eng.generate([unkeyed])
        eng.generate([unkeyed])
        assert seen == [pv1.shape[0]] * 2  # identity keys are not stable across calls: never cached
        seen.clear()
        with torch.no_grad():
            next(model.model.visual.parameters()).mul_(1.5)
        eng.generate([t1])
        assert seen == [pv1.shape[0]]  # new vision weights: encoded again
    finally:
        hook.remove()


def test_static_decode_prefills_each_distinct_prompt_once(tiny_bundle):
    """engine.static_cache with a request of n=3, a second request with the same prompt and image and another
    request: the prefill forward has one row per distinct prompt (2), its keys and values are written to every row
    that shows it, and each sample equals the dynamic cache's (which feeds every row), with a repetition penalty too
    (its history holds each row's prompt). share_prompts=False feeds all."""
    dyn = HFEngine(tiny_bundle, batch_size=8)
    static = HFEngine(tiny_bundle, batch_size=8, static_cache=True)
    for share, rows, kw in ((True, 2, {}), (False, 5, {}), (True, 2, {"repetition_penalty": 1.3, "top_k": 20})):
        same = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=16, n=3, **kw)
        twin = _req(tiny_bundle, "What colour is it?", IM1, seed=2, max_new_tokens=16, **kw)
        twin.image_keys, same.image_keys = ["k"], ["k"]
        other = _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=3, max_new_tokens=16,
                     **kw)
        reqs = [same, twin, other]
        static.share_prompts = share
        fed = []
        original = static.model.forward

        def spy(*a, _original=original, _fed=fed, **kw):
            _fed.append(tuple(kw["input_ids"].shape))
            return _original(*a, **kw)

        static.model.forward = spy
        try:
            got = static.generate(reqs)
        finally:
            del static.model.forward
        assert fed[0][0] == rows and all(s[0] == 5 for s in fed[1:])  # the prefill, then decode steps of 5 rows
        n = len(static.expand(same.prompt_ids, static.encode_images(same.images)[1]))
        assert static.shared_tokens == 3 * n * (1 + (share and bool(kw)))  # three rows copied the first one's
        want = dyn.generate(reqs)
        for w, g in zip(want, got, strict=True):
            for a, b in zip(w, g, strict=True):
                assert b.token_ids == a.token_ids
                assert torch.allclose(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5)


def test_decode_backend_reaches_the_decode_steps_attention(tiny_bundle, monkeypatch):
    """engine.decode_backend: the decode steps' attention runs under ``sdpa_kernel`` with that one backend (math here:
    the only one on CPU), in the static decode loop and in continuous batching, with generate's samples; the prefill
    is not restricted; an unknown name is an error; the recipe key reaches both engines ("auto": torch's choice)."""
    from vigorl_cli.engines import static_decode as sd
    from vigorl_cli.engines.factory import hf_engine
    from vigorl_cli.engines.hf_stream import HFStreamingEngine
    from vigorl_cli.recipe import load_recipe

    seen = []
    real = sd.sdpa_kernel

    def spy(backends):
        seen.append(tuple(backends))
        return real(backends)

    monkeypatch.setattr(sd, "sdpa_kernel", spy)
    reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=12),
            _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=2, max_new_tokens=12)]
    want = HFEngine(tiny_bundle, batch_size=8).generate(reqs)
    static = HFEngine(tiny_bundle, batch_size=8, static_cache=True)
    stream = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=16)
    from torch.nn.attention import SDPBackend

    for eng in (static, stream):
        eng.decode_backend = "math"
        seen.clear()
        got = eng.generate(reqs) if eng is static else None
        if eng is stream:
            for i, r in enumerate(reqs):
                eng.submit(r, i)
            out = {}
            while eng.in_flight():
                out.update(eng.poll())
            got = [out[0], out[1]]
        assert seen and set(seen) == {(SDPBackend.MATH,)}  # decode steps only (11 per row here)
        for w, g in zip(want, got, strict=True):
            assert g[0].token_ids == w[0].token_ids
            assert torch.allclose(torch.tensor(g[0].logprobs), torch.tensor(w[0].logprobs), atol=1e-5)
    static.decode_backend = "fastest"
    with pytest.raises(ValueError, match="decode_backend 'fastest'"):
        static.generate(reqs[:1])
    from typing import get_args, get_type_hints

    from vigorl_cli.recipe import EngineConfig

    assert get_args(get_type_hints(EngineConfig)["decode_backend"]) == ("auto", *sd.DECODE_BACKENDS)
    for over, want_backend in ((["engine.static_cache=true"], None),
                               (["engine.static_cache=true", "engine.decode_backend=efficient"], "efficient"),
                               (["engine.continuous_batching=true", "engine.decode_backend=cudnn"], "cudnn")):
        assert hf_engine(tiny_bundle, load_recipe(None, over).engine).decode_backend == want_backend


def test_capture_call_captures_without_emptying_the_caches(monkeypatch):
    """static_decode.capture_call (the prefill and vision graphs' capture), with torch.cuda stood in for on CPU:
    synchronise, capture ``fn`` on a side stream into the given pool — without emptying the device allocator's or
    the pinned host cache, as torch.cuda.graph does at every capture — and hand back its output; a failure inside
    ends the capture, warns and returns the reason; a torch whose capture API differs goes through torch.cuda.graph."""
    import contextlib

    from vigorl_cli.engines import static_decode as sd

    calls = []

    class Graph:
        def capture_begin(self, *pool):
            calls.append(("begin", pool))

        def capture_end(self):
            calls.append("end")

    @contextlib.contextmanager
    def stream(s):
        calls.append(("stream", s))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    made = iter(["side", "side2"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda: next(made))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: pytest.fail("emptied the device cache"))
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: pytest.fail("emptied the pinned cache"), raising=False)
    monkeypatch.setattr(sd, "_capture_streams", {})
    graph, out, err = sd.capture_call(lambda: calls.append("fn") or 7, "P", "test graphs", lane="a")
    assert isinstance(graph, Graph) and out == 7 and err is None
    assert calls == ["sync", ("stream", "side"), ("begin", ("P",)), "fn", "end"]
    # graphs that may replay beside each other are captured on different streams (their own cuBLAS workspaces);
    # a lane keeps its stream
    calls.clear()
    sd.capture_call(lambda: None, None, "test graphs", lane="b")
    sd.capture_call(lambda: None, None, "test graphs", lane="a")
    assert [c for c in calls if c[0] == "stream"] == [("stream", "side2"), ("stream", "side")]

    calls.clear()

    def boom():
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    with pytest.warns(UserWarning, match="test graphs: capture failed"):
        graph, out, err = sd.capture_call(boom, None, "test graphs", lane="a")
    assert (graph, out) == (None, None) and err == "RuntimeError: operation not permitted when stream is capturing"
    assert calls[:4] == ["sync", ("stream", "side"), ("begin", ()), "end"]

    class OldGraph(Graph):
        def capture_begin(self, *pool, **kw):
            raise TypeError("capture_begin() takes other arguments")

    used = []

    @contextlib.contextmanager
    def graph_cm(g, pool=None, stream=None):
        used.append((pool, stream))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", OldGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph_cm)
    graph, out, err = sd.capture_call(lambda: 5, "P", "test graphs", lane="a")
    assert isinstance(graph, OldGraph) and out == 5 and err is None and used == [("P", "side")]


def test_graphs_of_one_lane_are_dropped_together(tiny_bundle, monkeypatch):
    """PyTorch releases a capture stream's cuBLAS workspace when any graph captured on it is reset, under the other
    graphs of that stream (static_decode.capture_stream). So every owner of graphs has a lane of its own and drops
    its graphs all together, before capturing again: a GraphCache holding KEEP graphs drops all of them before the
    next capture, and all of them when a new graph's first replay disagrees; a StaticDecoder drops every state's
    graph when it evicts a state or when the parameters moved. Lanes of different owners differ."""
    from vigorl_cli.engines import static_decode as sd

    live_at_capture = []

    class Cache(sd.GraphCache):
        KEEP = 3

    cache = Cache(torch.nn.Linear(2, 2))

    def fake_capture(fn, pool, what, lane):
        assert lane == cache.lane
        live_at_capture.append(len(cache.graphs))
        return object(), torch.zeros(1), None

    monkeypatch.setattr(sd, "capture_call", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    for k in range(5):
        graph, out = cache._record(lambda: None)
        assert cache._admit(k, (graph,), out, torch.zeros(1))
    assert live_at_capture == [0, 1, 2, 0, 1] and list(cache.graphs) == [3, 4]
    with pytest.warns(UserWarning, match="replay differed"):
        assert not cache._admit(5, (object(),), torch.ones(1), torch.zeros(1))
    assert not cache.graphs and not cache.use_graphs
    assert Cache(torch.nn.Linear(2, 2)).lane != cache.lane

    dec = sd.StaticDecoder(tiny_bundle.model)
    params = SamplingParams(max_new_tokens=4)
    states = [dec._state(2, 32 + i, 4, params, torch.device("cpu"), torch.float32, (1,), ()) for i in range(4)]
    for st in states:
        st.graph, st.eager_steps = object(), 2
    dec._state(2, 64, 4, params, torch.device("cpu"), torch.float32, (1,), ())  # a fifth: the oldest goes
    assert len(dec.states) == 4 and all(st.graph is None and st.eager_steps == 0 for st in dec.states.values())
    assert dec.lane != sd.StaticDecoder(tiny_bundle.model).lane != cache.lane
    eng = HFEngine(tiny_bundle, static_cache=True)  # moved parameters: every state's graph goes, not only the one used
    eng.generate([_req(tiny_bundle, "x", IM1, seed=1, max_new_tokens=3)])
    eng.generate([_req(tiny_bundle, "y", IM2, seed=2, max_new_tokens=5)])
    assert len(eng._decoder.states) == 2
    for st in eng._decoder.states.values():
        st.graph, st.weights = object(), ("elsewhere",)
    eng.generate([_req(tiny_bundle, "x", IM1, seed=1, max_new_tokens=3)])
    assert all(st.graph is None for st in eng._decoder.states.values())
