"""HF continuous batching (engines/hf_stream.py): the no-barrier episode loop on the HF engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vigorl_cli.engines.base import GenerationRequest, SamplingParams
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.engines.hf_stream import HFStreamingEngine

ROOT = Path(__file__).resolve().parent.parent
IM1 = Image.new("RGB", (200, 120), (255, 0, 0))
IM2 = Image.new("RGB", (80, 300), (0, 0, 255))


def _req(bundle, text, img, key: str | None = None, **kw):
    """A one-image (or text-only) request; ``key``: its image's key (else the image's identity)."""
    content = ([{"type": "image"}] if img is not None else []) + [{"type": "text", "text": text}]
    prompt = bundle.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, [img] if img is not None else [], SamplingParams(**kw),
                             image_keys=[key] if key is not None else None)


def _drain(engine):
    got, polls = {}, 0
    while engine.in_flight():
        for tag, comps in engine.poll():
            got[tag] = comps
        polls += 1
        assert polls < 1000
    return got, polls


def test_streamed_requests_sample_what_generate_samples(tiny_bundle):
    """Five requests (one with n=2, one with a stop string, one without an image, limits 12..40) through three slots:
    waiting requests take slots as others finish; every sample equals HFEngine.generate's for the same request
    (tokens, raw log-probs, finish reason)."""
    gen = HFEngine(tiny_bundle, batch_size=8)
    eng = HFStreamingEngine(tiny_bundle, batch_size=3, cache_len=1024, max_new_cap=64)
    reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=30),
            _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=2, max_new_tokens=12),
            _req(tiny_bundle, "x", IM1, seed=3, max_new_tokens=40, stop=("e",)),
            _req(tiny_bundle, "Another one", IM2, seed=4, max_new_tokens=25, n=2),
            _req(tiny_bundle, "hello there", None, seed=5, max_new_tokens=20)]
    for i, r in enumerate(reqs):
        eng.submit(r, i)
    assert eng.in_flight() == 5
    got, polls = _drain(eng)
    assert polls > 25 // eng.CHECK_EVERY  # several rounds: three slots for six samples (the longest takes 25)
    for i, r in enumerate(reqs):
        want = gen.generate([r])[0]
        assert len(got[i]) == r.params.n
        for w, g in zip(want, got[i], strict=True):
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)
    assert got[2][0].stop_reason == "e" or got[2][0].finish_reason == "length"


def test_a_request_with_more_samples_than_slots_spans_several_fills(tiny_bundle):
    """n = 5 samples through 2 slots: the samples are placed as slots free up, each exactly once, and equal
    generate's five samples of the request (seeds derived per sample)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    req = _req(tiny_bundle, "What colour is it?", IM1, seed=7, max_new_tokens=10, n=5)
    other = _req(tiny_bundle, "hi", None, seed=8, max_new_tokens=6)
    eng.submit(req, "a")
    eng.submit(other, "b")
    got, _ = _drain(eng)
    want = HFEngine(tiny_bundle, batch_size=8).generate([req, other])
    assert [c.token_ids for c in got["a"]] == [c.token_ids for c in want[0]]
    assert len({tuple(c.token_ids) for c in got["a"]}) > 1  # five different samples, not one placed five times
    assert got["b"][0].token_ids == want[1][0].token_ids


def test_a_request_that_does_not_fit_fails_alone(tiny_bundle):
    """A prompt + limit beyond the cache is an error completion for that request; the others still run, and a
    repetition-penalty request (not in the slot graph) is served by one generate call."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=64, max_new_cap=64)
    big = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=30)
    _, grid = eng.encode_images(big.images)
    assert len(eng.expand(big.prompt_ids, grid)) + 30 > 64
    small = _req(tiny_bundle, "hi", None, seed=2, max_new_tokens=8)
    rep = _req(tiny_bundle, "hi", None, seed=3, max_new_tokens=8, repetition_penalty=1.3)
    for i, r in enumerate((big, small, rep)):
        eng.submit(r, i)
    got, _ = _drain(eng)
    assert got[0][0].finish_reason == "error" and "cache length 64" in got[0][0].error
    assert got[1][0].token_ids == HFEngine(tiny_bundle).generate([small])[0][0].token_ids
    assert got[2][0].token_ids == HFEngine(tiny_bundle).generate([rep])[0][0].token_ids


def test_no_barrier_multiturn_episodes_equal_the_turn_synchronous_ones():
    """benchmarks/multiturn_rollout.py --engine hf: the same multi-turn zoom episodes (scripted tool calls, drawn turn
    lengths) through the turn-synchronous loop (HFEngine) and the no-barrier loop (HFStreamingEngine), identical."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multiturn_rollout.py"), "--tiny", "--engine", "hf",
                          "--episodes", "8", "--min-tokens", "4", "--max-tokens", "16", "--slots", "4",
                          "--max-model-len", "2048"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith('{"benchmark"')][-1])
    assert final["identical_episodes"] and final["identical_fraction"] == 1.0
    r = final["results"]
    assert r["turn_synchronous"]["engine"] == "HFEngine" and r["no_barrier"]["engine"] == "HFStreamingEngine"
    assert r["no_barrier"]["turns"] == r["turn_synchronous"]["turns"] > 8  # episodes took several turns
    assert r["no_barrier"]["reused_prompt_tokens"] > 0  # next turns were prefilled from their cached prefix
    assert r["no_barrier"]["graphs_captured"] == 0 and r["no_barrier"]["capture_error"] is None  # CPU: eager


@pytest.mark.parametrize("pipeline,overlap,cover,graphs,share", [
    (False, False, 16, False, False), (True, False, 16, False, False), (False, True, 16, False, False),
    (True, True, 16, False, False), (True, True, 5, False, False), (True, True, 40, False, False),
    (True, False, 16, True, False), (True, True, 16, True, False), (False, False, 16, False, True),
    (True, False, 16, False, True), (True, True, 16, True, True)])
def test_random_arrivals_slot_counts_and_limits_match_generate(tiny_bundle, pipeline, overlap, cover, graphs, share):
    """Seeded random workloads: requests arrive between polls (as the no-barrier loop submits next turns), with
    random n, limits, stop strings and images, through 1–4 slots; every sample equals generate's. Also with
    ``pipeline`` (a GPU's default; forced here): the next chunk is launched before poll returns, and requests
    arriving meanwhile are prefilled after it; and with ``overlap`` (opt-in): a prefill's rows join the
    decoding slots one chunk later, their slots decoding into the dump column meanwhile, and the chunk launched
    before such a prefill is ``PREFILL_COVER`` steps long (40: longer than any limit here, so finished rows decode
    on for many steps before their collect); and with ``prefill_graphs``: the language model's part of every
    prefill runs at a bucketed shape (padding rows and columns; eagerly on CPU, a CUDA graph per bucket on a GPU);
    and with ``share_prompts``: rows of a prefill with the same prompt (n=2, a repeated text and image) are fed once."""
    import random

    gen = HFEngine(tiny_bundle, batch_size=8)
    texts = ["What colour is it?", "x", "Where is the dog in this much longer question?", "count the boxes"]
    shared = 0
    for trial in range(3):
        rng = random.Random(trial)
        eng = HFStreamingEngine(tiny_bundle, batch_size=rng.randint(1, 4), cache_len=512, max_new_cap=24)
        assert eng.pipeline is False and eng.overlap is False  # defaults on CPU
        eng.pipeline, eng.overlap, eng.PREFILL_COVER, eng.prefill_graphs = pipeline, overlap, cover, graphs
        eng.share_prompts = share
        reqs = [_req(tiny_bundle, rng.choice(texts), rng.choice([IM1, IM2, None]), seed=100 * trial + i,
                     max_new_tokens=rng.randint(1, 24), n=rng.choice([1, 1, 2]),
                     stop=rng.choice([(), ("e",), ("a", "o")]))
                for i in range(6)]
        pending, got = list(enumerate(reqs)), {}
        while pending or eng.in_flight():
            for _ in range(rng.randint(0, 2)):  # 0-2 arrivals per poll
                if pending:
                    i, r = pending.pop(0)
                    eng.submit(r, i)
            for tag, comps in eng.poll():
                got[tag] = comps
        for i, r in enumerate(reqs):
            want = gen.generate([r])[0]
            assert [c.token_ids for c in got[i]] == [c.token_ids for c in want], (trial, i)
            assert [c.finish_reason for c in got[i]] == [c.finish_reason for c in want], (trial, i)
            assert torch.allclose(torch.tensor([x for c in got[i] for x in c.logprobs]),
                                  torch.tensor([x for c in want for x in c.logprobs]), atol=1e-4), (trial, i)
        if graphs:  # every prefill went through the buckets (eagerly: no CUDA graphs on CPU)
            assert eng._lm_graphs.padded == eng.prefills > 0 and eng._lm_graphs.captures == 0
        shared += eng.shared_tokens
    assert (shared > 0) == share


def test_decode_steps_are_free_of_host_syncs(tiny_bundle, monkeypatch):
    """What a CUDA graph cannot capture, checked on CPU: during one decode step of the batch decoder and of the slot
    decoder nothing reads a tensor's value on the host (.item / .tolist / bool / int / float / .cpu / .numpy) and
    no tensor is built from host data (torch.tensor)."""
    from vigorl_cli.engines import static_decode

    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=512, max_new_cap=16)
    eng.submit(_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=16), "a")
    eng._fill()  # prefill: host work allowed
    batch = HFEngine(tiny_bundle, static_cache=True)
    batch.generate([_req(tiny_bundle, "x", IM2, seed=2, max_new_tokens=8)])  # leaves its decode state behind
    (key, st), = batch._decoder.states.items()
    st.step.fill_(1)  # rewind: one more step fits the output buffers
    params = SamplingParams(temperature=1.0, max_new_tokens=8)

    def forbidden(*a, **k):
        raise AssertionError("host sync inside a decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)
    with torch.no_grad(), static_decode.decode_attention(tiny_bundle.model):
        eng._step()
        batch._decoder._decode_step(st, params)
    monkeypatch.undo()
    assert int(st.step) == 2 and eng._st["step"].tolist()[0] == 1


@pytest.mark.parametrize("towers", [False, True])
def test_prefill_copies_to_the_device_never_wait_for_it(tiny_bundle, monkeypatch, towers):
    """On a GPU a copy from pageable host memory (``tensor.to(device)``, ``torch.tensor(..., device=...)``) makes the
    host wait for the stream's queued work — before a prefill, the decode chunk in flight. Checked on CPU: in the
    engine's own code and models/load.py, fills, prefills (fresh rows and a next turn continuing its slot, images
    through ``shared_image_features``) and joins move host tensors only through ``models/load.to_device`` (pinned,
    non-blocking on a GPU). Also with ``vision_graphs`` (the tower per group of same-grid images)."""
    import sys

    import vigorl_cli.engines.hf_stream as hs
    import vigorl_cli.models.load as ld
    import vigorl_cli.models.vision_graphs as vg

    def ours() -> bool:  # the caller is the engine's code or the vision tower's feeding (shared_image_features)
        code = sys._getframe(2).f_code
        return (code.co_filename in (hs.__file__, ld.__file__, vg.__file__)
                and code.co_name not in ("to_device", "cat_to_device"))

    real_to, real_tensor, moved = torch.Tensor.to, torch.tensor, []

    def to(self, *a, **kw):
        if ours() and (kw.get("device") is not None or any(isinstance(x, (torch.device, str)) for x in a)):
            raise AssertionError("a host-to-device copy outside to_device")
        return real_to(self, *a, **kw)

    def tensor(*a, **kw):
        if ours() and kw.get("device") is not None:
            raise AssertionError("torch.tensor(..., device=...) in the engine")
        return real_tensor(*a, **kw)

    def recorded(x, device):
        moved.append(tuple(x.shape))
        return load_to_device(x, device)

    from vigorl_cli.models.load import to_device as load_to_device

    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    eng.vision_graphs = towers
    first = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=6, key="s/full")
    other = _req(tiny_bundle, "x", IM2, seed=2, max_new_tokens=4)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(hs, "to_device", recorded)
    eng.submit(first, "t1")
    eng.submit(other, "o")
    got = _drain(eng)[0]
    eng.submit(_next_turn(tiny_bundle, first, got["t1"][0], IM2, "s/crop-1"), "t2")
    got.update(_drain(eng)[0])
    monkeypatch.undo()
    assert set(got) == {"t1", "o", "t2"} and eng.prefills == 2 and eng.reused_tokens > 0
    assert len(moved) >= 2 * 9  # per prefill: ids, positions, destinations, slots, pixels, grids; join: 3; start: 2
    assert (eng._tower_graphs is not None and eng._tower_graphs.eager > 0) == towers


@pytest.mark.parametrize("graphs", [False, True])
def test_a_next_turn_is_prefilled_from_the_cached_prefix_of_its_episode(tiny_bundle, graphs):
    """Turn 2's prompt = turn 1's prompt + its completion + an observation with a new image: the engine prefills
    only the new tokens into turn 1's slot (its cache holds the rest) and samples what generate samples from the full
    prompt. A prompt with the same tokens but another first image (same size) is not served from that cache."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    eng.prefill_graphs = graphs  # (bucketed language-model prefill: the held prefix is read the same)
    first = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=12, key="s/full")
    eng.submit(first, "t1")
    got, _ = _drain(eng)
    c1 = got["t1"][0]
    obs = tiny_bundle.tokenizer("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>look"
                                "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    second = GenerationRequest(first.prompt_ids + c1.token_ids + obs, [IM1, IM2],
                               SamplingParams(seed=2, max_new_tokens=10), image_keys=["s/full", "s/crop-1"])
    eng.submit(second, "t2")
    got, _ = _drain(eng)
    _, grid = eng.encode_images(first.images)
    # the first prompt (image included) and the completion were not prefilled again
    assert eng.reused_tokens == len(eng.expand(first.prompt_ids, grid)) + len(c1.token_ids)
    want = HFEngine(tiny_bundle).generate([second])[0][0]
    assert got["t2"][0].token_ids == want.token_ids
    assert torch.allclose(torch.tensor(got["t2"][0].logprobs), torch.tensor(want.logprobs), atol=1e-4)

    reused = eng.reused_tokens
    eng.submit(first, "t1b")  # turn 1 again: a prefix of what the slot holds (all but its last token reused)
    again, _ = _drain(eng)
    assert eng.reused_tokens == reused + len(eng.expand(first.prompt_ids, grid)) - 1
    assert again["t1b"][0].token_ids == c1.token_ids
    reused = eng.reused_tokens
    other = GenerationRequest(second.prompt_ids, [Image.new("RGB", (200, 120), (0, 255, 0)), IM2],
                              SamplingParams(seed=2, max_new_tokens=10), image_keys=["t/full", "t/crop-1"])
    eng.submit(other, "x")
    got, _ = _drain(eng)
    assert eng.reused_tokens == reused  # same placeholder tokens, different image: a fresh prefill
    assert got["x"][0].token_ids == HFEngine(tiny_bundle).generate([other])[0][0].token_ids


def _short_and_long(bundle):
    """A short first turn (6 tokens, named image) and a long request (60 tokens) to decode beside it."""
    first = _req(bundle, "What colour is it?", IM1, seed=1, max_new_tokens=6, key="s/full")
    return first, _req(bundle, "Where is the dog in this much longer question?", IM2, seed=5, max_new_tokens=60)


def _until(eng, tag) -> dict:
    got = {}
    while tag not in got:
        got.update(eng.poll())
    return got


def _then_next_turn(bundle, eng, first, got, before=None):
    """Submit ``first``'s next turn (after ``before()``) and drain into ``got``: ``(next turn, prompt tokens its
    slot held: first's expanded prompt and completion)``."""
    c1 = got["t1"][0]
    second = _next_turn(bundle, first, c1, IM2, "s/crop-1")
    if before is not None:
        before()
    eng.submit(second, "t2")
    got.update(_drain(eng)[0])
    _, grid = eng.encode_images(first.images)
    return second, len(eng.expand(first.prompt_ids, grid)) + len(c1.token_ids)


def _equal_generate(bundle, got, reqs: dict, logprobs: bool = False) -> None:
    gen = HFEngine(bundle)
    for tag, req in reqs.items():
        want = gen.generate([req])[0][0]
        assert got[tag][0].token_ids == want.token_ids, tag
        if logprobs:
            assert torch.allclose(torch.tensor(got[tag][0].logprobs), torch.tensor(want.logprobs), atol=1e-4), tag


@pytest.mark.parametrize("behind", [False, True])
def test_pipelined_chunks_leave_a_parked_prefix_intact(tiny_bundle, behind):
    """With ``pipeline``, a chunk runs between a turn's collect and its next turn's prefill while another request
    decodes, so the parked slot steps on (idle) and writes past its cached tokens. The next turn still continues
    from the parked prefix and samples what generate samples from the full prompt. With ``launch_before_collect``
    the finished slot also decodes on through the chunk launched before its collect (into its own cache, past the
    tokens it parks)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    eng.pipeline, eng.launch_before_collect = True, behind
    first, long = _short_and_long(tiny_bundle)
    eng.submit(first, "t1")
    eng.submit(long, "long")
    got = _until(eng, "t1")
    assert eng._chunk  # the long request decodes on in a chunk launched before poll returned
    second, held = _then_next_turn(tiny_bundle, eng, first, got, before=eng.poll)  # a chunk with the slot idle
    assert eng.reused_tokens == held
    _equal_generate(tiny_bundle, got, {"t2": second, "long": long})


@pytest.mark.parametrize("pipeline", [False, True])
def test_an_overlapped_prefill_joins_after_a_chunk_and_leaves_its_slot_intact(tiny_bundle, monkeypatch, pipeline):
    """``overlap`` (forced on CPU): a request that arrives while another decodes is prefilled at once, but its row
    joins the decoding slots only at the first collect after its launch; the chunk in between steps its slot into
    the dump column, not over the prompt it was prefilled with. A next turn prefilled that way continues its parked
    prefix. Samples equal generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    eng.pipeline, eng.overlap = pipeline, True
    chunks = []  # per collected chunk: which slots decoded a request, which slots a prefill held in flight
    collect = eng._collect

    def logged():
        chunks.append(([i for i, r in enumerate(eng._rows) if r is not None],
                       [t.slot for t in eng._pending.todo] if eng._pending else []))
        collect()

    monkeypatch.setattr(eng, "_collect", logged)
    first, long = _short_and_long(tiny_bundle)
    eng.submit(long, "long")
    eng.poll()  # nothing decodes yet: prefilled and joined at once
    assert chunks[0] == ([0], [])
    eng.submit(first, "t1")
    got = _until(eng, "t1")
    pend = [c for c in chunks if c[1]]
    assert pend and pend[0] == ([0], [1])  # t1's slot sat out a chunk while the long request decoded
    assert all(1 in c[0] for c in chunks[chunks.index(pend[-1]) + 1:])  # then it decoded
    second, held = _then_next_turn(tiny_bundle, eng, first, got)
    assert eng.reused_tokens == held
    _equal_generate(tiny_bundle, got, {"long": long, "t1": first, "t2": second}, logprobs=True)
    assert eng._st["cache"].pos.tolist() == [eng.cache_len] * 2  # both free: at the dump column


@pytest.mark.parametrize("cover", [8, 20])
def test_with_overlap_the_chunk_before_a_prefill_covers_it(tiny_bundle, monkeypatch, cover):
    """With ``overlap``, the chunk launched just before a prefill is ``PREFILL_COVER`` steps long (the prefill's
    host time is spent while it decodes); every other chunk is ``CHECK_EVERY`` long. The rows of that prefill join
    at the next collect, and every sample equals generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    eng.pipeline, eng.overlap, eng.prefill_min, eng.PREFILL_COVER = True, True, 1, cover
    log = []  # ("advance", n) / ("prefill", slots), in call order
    advance, prefill = eng._advance, eng._prefill
    monkeypatch.setattr(eng, "_advance", lambda n: (log.append(("advance", n)), advance(n))[1])
    monkeypatch.setattr(eng, "_prefill", lambda items: (log.append(("prefill", [t.slot for t in items])),
                                                        prefill(items))[1])
    first, long = _short_and_long(tiny_bundle)
    eng.submit(long, "long")
    eng.poll()  # nothing decodes: a blocking prefill, a chunk, its collect, the next (pipelined) chunk
    assert log == [("prefill", [0]), ("advance", 8), ("advance", 8)]
    eng.submit(first, "t1")
    got, _ = _drain(eng)
    i = log.index(("prefill", [1]))
    assert log[i - 1] == ("advance", cover)  # the chunk launched just before it
    assert all(n == 8 for k, (what, n) in enumerate(log) if what == "advance" and k != i - 1)
    assert eng.decode_steps == sum(n for what, n in log if what == "advance")
    _equal_generate(tiny_bundle, got, {"long": long, "t1": first}, logprobs=True)


def test_with_overlap_a_freed_slot_waits_one_poll_for_its_episodes_next_turn(tiny_bundle):
    """With ``overlap`` the fill runs after the collect, in the poll that frees a slot, before the caller could
    submit that episode's next turn: a fresh request waiting in the queue must not take the slot then. The next turn,
    submitted after that poll, continues the slot's cached prefix; the fresh request starts later. Samples equal
    generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    eng.pipeline, eng.overlap, eng.prefill_min = True, True, 1
    first, long = _short_and_long(tiny_bundle)
    fresh = _req(tiny_bundle, "count the boxes", IM2, seed=7, max_new_tokens=5)
    eng.submit(long, "long")
    eng.submit(first, "t1")
    eng.submit(fresh, "fresh")  # waits: both slots busy
    got = _until(eng, "t1")
    assert eng._pending is None and "fresh" not in got  # the freed slot was held, not prefilled for "fresh"
    second, held = _then_next_turn(tiny_bundle, eng, first, got)
    assert eng.reused_tokens >= held  # t2 continued t1's slot (fresh may reuse a chat-template opening too)
    _equal_generate(tiny_bundle, got, {"long": long, "t1": first, "t2": second, "fresh": fresh})


def test_after_an_abort_a_new_request_samples_what_generate_samples(tiny_bundle):
    """``abort`` mid-decode (a rollout given up) leaves no slot writing where a later prefill puts its prompt: with
    ``overlap`` the next request's slot decodes through a chunk before its row joins, and must do so into the dump
    column, not at the aborted request's position (inside the new prompt)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    eng.overlap = True
    first, long = _short_and_long(tiny_bundle)
    eng.submit(long, "a")  # slot 0
    eng.submit(_req(tiny_bundle, "x", None, seed=3, max_new_tokens=30), "b")  # slot 1: a short prompt
    eng.poll()
    stale = int(eng._st["cache"].pos[1])  # where slot 1 writes next
    eng.abort()
    eng.submit(long, "long")  # slot 0, decoding from the next poll on
    got = dict(eng.poll())
    eng.submit(first, "t1")  # slot 1: its prompt runs past ``stale``, and it waits a chunk before it joins
    got.update(_drain(eng)[0])
    assert stale < len(eng.expand(first.prompt_ids, eng.encode_images(first.images)[1]))
    _equal_generate(tiny_bundle, got, {"long": long, "t1": first}, logprobs=True)


def test_common_prefix_and_reuse_cut_at_the_first_differing_image():
    from vigorl_cli.engines.hf_stream import _Parked, _Prepared, common_prefix

    a = list(range(100))
    assert common_prefix(a, a, 100) == 100 and common_prefix(a, a, 40) == 40
    assert common_prefix(a, a[:37] + [-1] + a[38:], 100) == 37
    assert common_prefix(a, [-1] + a[1:], 100) == 0 and common_prefix(a, a[:5], 100) == 5 and common_prefix(a, a, 0) == 0
    # a parked slot's positions: its prompt's (text, a 1×2×3 image at 1, text), then one per sampled token
    prompt = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 4], [0, 1, 1, 1, 2, 2, 2, 4], [0, 1, 2, 3, 1, 2, 3, 4]])
    held = _Parked(list(range(11)), ["i"], 0, 0, prompt)
    assert torch.equal(held.prefix(7), prompt[:, :7]) and held.prefix(0).shape == (3, 0)
    assert held.prefix(11)[:, 8:].tolist() == [[5, 6, 7]] * 3
    # prompt: 4 text tokens, image 0 at [4, 7), 2 text, image 1 at [9, 12), 3 text
    ids = [1, 2, 3, 4, 9, 9, 9, 5, 6, 9, 9, 9, 7, 8, 0]
    prep = _Prepared(ids, [None, None], None, ["full", "crop"], [(4, 7), (9, 12)])
    eng = HFStreamingEngine.__new__(HFStreamingEngine)
    assert eng._reusable(prep, _Parked(ids[:13], ["full", "crop"], 0)) == 13  # same images: the whole prefix
    assert eng._reusable(prep, _Parked(ids[:13], ["full", "other"], 0)) == 9  # up to the image that differs
    assert eng._reusable(prep, _Parked(ids[:13], ["other", "crop"], 0)) == 4  # the text before the first image
    assert eng._reusable(prep, _Parked(ids[:10], ["full", "crop"], 0)) == 9  # would split image 1
    assert eng._reusable(prep, _Parked(ids + [5], ["full", "crop"], 0)) == len(ids) - 1  # one token left to feed


def test_a_next_turn_keeps_its_slot_when_an_earlier_request_shares_its_image(tiny_bundle):
    """A GRPO group-mate (same first prompt and image) waits ahead of an episode's next turn: the next turn still
    continues its own slot (the longer reuse), and the group-mate takes the other parked slot, reusing the chat
    template's opening that every prompt shares. Both sample what generate samples."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    first = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=12, key="s/full")
    other = _req(tiny_bundle, "Where is the dog?", IM2, seed=3, max_new_tokens=8, key="t/full")
    eng.submit(first, "t1")
    eng.submit(other, "o")
    got, _ = _drain(eng)
    c1 = got["t1"][0]
    second = _next_turn(tiny_bundle, first, c1, IM2, "s/crop-1")
    mate = GenerationRequest(first.prompt_ids, [IM1], SamplingParams(seed=9, max_new_tokens=6),
                             image_keys=["s/full"])
    eng.submit(mate, "mate")  # queued first
    eng.submit(second, "t2")
    got, _ = _drain(eng)
    assert eng.prefills == 2  # both rows in one prefill
    _, grid = eng.encode_images(first.images)
    full = eng.expand(first.prompt_ids, grid)
    start = full.index(eng.image_token_id)  # the opening before the first image: what any other prompt shares
    assert eng.reused_tokens == len(full) + len(c1.token_ids) + start
    # every prompt token was either reused or fed; the padding counter adds the left padding of each prefill
    prompts = sum(len(eng.expand(r.prompt_ids, eng.encode_images(r.images)[1])) for r in (first, other, mate, second))
    assert eng.prefill_tokens[0] + eng.reused_tokens == prompts and eng.prefill_tokens[1] >= eng.prefill_tokens[0]
    gen = HFEngine(tiny_bundle)
    assert got["t2"][0].token_ids == gen.generate([second])[0][0].token_ids
    assert got["mate"][0].token_ids == gen.generate([mate])[0][0].token_ids


def test_waiting_requests_are_not_prepared_before_they_can_be_placed(tiny_bundle, monkeypatch):
    """A long queue of first turns (a GRPO rollout submits every episode at once) is not image-processed while it
    waits: the continuation search only prepares requests whose first image a parked slot holds, so pixels are
    processed as requests are placed (the queue would otherwise hold every episode's pixel tensor at once)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=1, cache_len=1024, max_new_cap=16)
    reqs = []
    for i in range(6):
        r = _req(tiny_bundle, f"question {i}?", IM1 if i % 2 else IM2, seed=i, max_new_tokens=4)
        r.image_keys = [f"e{i}/full"]
        reqs.append(r)
        eng.submit(r, i)
    processed = []
    real = eng._process
    monkeypatch.setattr(eng, "_process", lambda images: processed.append(len(images)) or real(images))
    got = {}
    for _ in range(2):  # the first request runs and parks; the second is placed in its slot
        got.update(eng.poll())
    assert sum(processed) == 2 and [e[4] for e in eng._queue] == [None] * 4
    got.update(_drain(eng)[0])
    assert sum(processed) == 6
    gen = HFEngine(tiny_bundle)
    assert all(got[i][0].token_ids == gen.generate([r])[0][0].token_ids for i, r in enumerate(reqs))


def test_a_weight_update_between_turns_invalidates_the_cached_prefixes(tiny_bundle):
    """A slot's cached keys and values were computed with the weights of their time: after an in-place update (an
    optimizer step, a weight sync) the next turn is prefilled afresh, and samples what generate samples now, even
    when another slot has been parked under the new weights since."""
    import copy

    from vigorl_cli.models.load import ModelBundle

    model = copy.deepcopy(tiny_bundle.model)
    bundle = ModelBundle(model, tiny_bundle.processor, "x", "qwen2_5_vl")
    eng = HFStreamingEngine(bundle, batch_size=1, cache_len=1024, max_new_cap=32)  # one slot: every request reuses it
    first = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=12)
    eng.submit(first, "t1")
    _drain(eng)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    other = _req(tiny_bundle, "hi", None, seed=3, max_new_tokens=4)
    eng.submit(other, "other")  # parked under the new weights
    _drain(eng)
    eng.submit(first, "again")
    got, _ = _drain(eng)
    # only the chat template's opening, which `other` (computed under the new weights) shares, is reused
    full = eng.expand(first.prompt_ids, eng.encode_images(first.images)[1])
    shared = next(i for i, (a, b) in enumerate(zip(full, other.prompt_ids)) if a != b)
    assert shared >= eng.MIN_REUSE and eng.reused_tokens == shared
    assert got["again"][0].token_ids == HFEngine(bundle).generate([first])[0][0].token_ids


def _next_turn(bundle, first, completion, img, key):
    obs = bundle.tokenizer("<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>look"
                           "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    return GenerationRequest(first.prompt_ids + completion.token_ids + obs, first.images + [img],
                             SamplingParams(seed=first.params.seed + 100, max_new_tokens=9),
                             image_keys=list(first.image_keys) + [key])


def test_next_turns_and_new_requests_share_one_prefill_forward(tiny_bundle):
    """Three episodes' next turns (each continuing its own slot's cache, prefixes of different lengths) and a new
    request start together: one prefill forward of four rows (left-padded, each written after its slot's prefix),
    and every sample equals generate's for the whole prompt."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=4, cache_len=1024, max_new_cap=32)
    firsts = [_req(tiny_bundle, q, im, seed=i + 1, max_new_tokens=m)
              for i, (q, im, m) in enumerate([("What colour is it?", IM1, 12), ("x", IM2, 5),
                                              ("Where is the dog in this much longer question?", IM1, 20)])]
    for i, f in enumerate(firsts):
        f.image_keys = [f"e{i}/full"]
        eng.submit(f, i)
    got, _ = _drain(eng)
    seconds = [_next_turn(tiny_bundle, f, got[i][0], IM2 if i % 2 else IM1, f"e{i}/crop") for i, f in
               enumerate(firsts)]
    fresh = _req(tiny_bundle, "count the boxes", IM2, seed=9, max_new_tokens=7)
    prefills, reused = eng.prefills, eng.reused_tokens
    for i, r in enumerate(seconds + [fresh]):
        eng.submit(r, ("t2", i))
    got2, _ = _drain(eng)
    assert eng.prefills == prefills + 1  # all four rows in one forward
    grids = [eng.encode_images(f.images)[1] for f in firsts]
    assert eng.reused_tokens - reused == sum(len(eng.expand(f.prompt_ids, g)) + len(got[i][0].token_ids)
                                             for i, (f, g) in enumerate(zip(firsts, grids)))
    gen = HFEngine(tiny_bundle, batch_size=8)
    for i, r in enumerate(seconds + [fresh]):
        want = gen.generate([r])[0][0]
        assert got2[("t2", i)][0].token_ids == want.token_ids, i
        assert torch.allclose(torch.tensor(got2[("t2", i)][0].logprobs), torch.tensor(want.logprobs), atol=1e-4)


def test_while_slots_decode_a_lone_waiting_request_waits_to_share_a_prefill(tiny_bundle):
    """Eight slots, twelve requests finishing at different steps: the four that wait are not prefilled one by one
    as single slots free up (a prefill stalls every decoding slot) but in fewer, larger forwards, and none waits
    longer than PREFILL_WAIT polls once a slot is free; samples equal generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=8, cache_len=512, max_new_cap=64)
    assert eng.prefill_min == 2
    reqs = [_req(tiny_bundle, "What colour is it?", IM1 if i % 2 else None, seed=i, max_new_tokens=8 * (i + 1))
            for i in range(8)]
    reqs += [_req(tiny_bundle, "x", IM2, seed=20 + i, max_new_tokens=6) for i in range(4)]
    for i, r in enumerate(reqs):
        eng.submit(r, i)
    got, _ = _drain(eng)
    assert eng.prefills == 3  # the first eight; then two rows once two slots are free; then the last two
    gen = HFEngine(tiny_bundle, batch_size=12)
    want = gen.generate(reqs)
    for i in range(len(reqs)):
        assert got[i][0].token_ids == want[i][0].token_ids, i


def test_an_episodes_earlier_image_is_neither_processed_nor_encoded_again(tiny_bundle, monkeypatch):
    """A next turn names its episode's first image by key: its grid is remembered and its pixels are not processed
    again. When its slot went to another request meanwhile, the fresh prefill takes the image's features from the
    engine's feature cache (not processed, not encoded); without them it processes and encodes the image after all.
    Samples equal generate's either way."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=1, cache_len=1024, max_new_cap=32)
    seen = []
    process = eng._process
    monkeypatch.setattr(eng, "_process", lambda images: seen.append(len(images)) or process(images))
    for name, cached in (("e", True), ("f", False)):
        first = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=6)
        first.image_keys = [f"{name}/full"]
        eng.submit(first, "t1")
        c1 = _drain(eng)[0]["t1"][0]
        eng.submit(_req(tiny_bundle, "Something else entirely, a longer question", IM2, seed=5, max_new_tokens=4),
                   "x")
        _drain(eng)  # the only slot now holds another prompt
        if not cached:
            eng._features.clear()
        seen.clear()
        second = _next_turn(tiny_bundle, first, c1, IM2, f"{name}/crop")
        eng.submit(second, "t2")
        got = _drain(eng)[0]["t2"][0]
        # the new crop when the request was queued; the full image again only without its cached features
        assert [n for n in seen if n] == ([1] if cached else [1, 1]), name
        assert got.token_ids == HFEngine(tiny_bundle).generate([second])[0][0].token_ids


def test_a_groups_shared_first_image_is_encoded_once_per_prefill(tiny_bundle, monkeypatch):
    """Four episodes of a GRPO group start from the same image (same key): one prefill encodes it once, and each
    sample equals generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=4, cache_len=1024, max_new_cap=16)
    visual = tiny_bundle.model.model.visual
    calls = []
    hook = visual.register_forward_hook(
        lambda m, a, kw, o: calls.append(int((a[1] if len(a) > 1 else kw["grid_thw"]).shape[0])), with_kwargs=True)
    try:
        reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=10 + i, max_new_tokens=5) for i in range(4)]
        for i, r in enumerate(reqs):
            r.image_keys = ["s/full"]
            eng.submit(r, i)
        got, _ = _drain(eng)
    finally:
        hook.remove()
    assert eng.prefills == 1 and calls == [1]  # one vision forward, of one image
    for i, r in enumerate(reqs):
        assert got[i][0].token_ids == HFEngine(tiny_bundle).generate([r])[0][0].token_ids


def test_decode_reads_grow_with_the_sequences_and_sample_the_same(tiny_bundle):
    """Decode attention reads the cache only up to a bucket past the longest busy slot (one graph per width on a
    GPU): with 8-position buckets the width changes between the host checks, and the samples equal
    generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=512, max_new_cap=40)
    eng.READ_BUCKET = 8
    widths = []
    read_width = eng._read_width
    eng._read_width = lambda n: widths.append(read_width(n)) or widths[-1]
    reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=40),
            _req(tiny_bundle, "hello there", None, seed=5, max_new_tokens=33),
            _req(tiny_bundle, "x", IM2, seed=3, max_new_tokens=20)]
    for i, r in enumerate(reqs):
        eng.submit(r, i)
    got, _ = _drain(eng)
    assert len(set(widths)) >= 3 and max(widths) < 512 and all(w % 8 == 0 for w in widths)
    for i, r in enumerate(reqs):
        want = HFEngine(tiny_bundle).generate([r])[0][0]
        assert got[i][0].token_ids == want.token_ids, i
        assert torch.allclose(torch.tensor(got[i][0].logprobs), torch.tensor(want.logprobs), atol=1e-5)


def test_a_long_queue_is_prefilled_in_batches_not_one_slot_at_a_time(tiny_bundle):
    """Forty requests queued at once, eight slots freeing one by one: after the first fill, every prefill starts at
    least a quarter of the slots, comes PREFILL_WAIT polls after the previous one, or finds no slot decoding;
    samples equal generate's."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=8, cache_len=512, max_new_cap=48)
    log = []
    prefill = eng._prefill
    eng._prefill = lambda items: log.append((eng._polls, len(items), any(eng._rows))) or prefill(items)
    reqs = [_req(tiny_bundle, "x" * (1 + i % 5), None, seed=i, max_new_tokens=4 + (7 * i) % 41) for i in range(40)]
    for i, r in enumerate(reqs):
        eng.submit(r, i)
    got, _ = _drain(eng)
    assert log[0][1] == 8
    for (p0, _, _), (p1, rows, busy) in zip(log, log[1:]):
        assert rows >= eng.prefill_min or p1 - p0 >= eng.PREFILL_WAIT or not busy, log
    assert len(log) < 20  # one slot at a time would take ~32
    want = HFEngine(tiny_bundle, batch_size=40).generate(reqs)
    assert all(got[i][0].token_ids == want[i][0].token_ids for i in range(40))


def _multiturn_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtr", ROOT / "benchmarks" / "multiturn_rollout.py")
    mtr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mtr)
    return mtr


def test_multiturn_benchmark_watchdog_dumps_where_a_run_hangs(tmp_path):
    """benchmarks/multiturn_rollout.py --run-timeout: a run still going after its seconds gets every thread's stack
    written (where it waits; the benchmark then ends the process, not here); a run that ends in time, nothing."""
    import time

    mtr = _multiturn_benchmark()
    with open(tmp_path / "late.txt", "w") as f, mtr.watchdog(0.2, file=f, end=False):
        time.sleep(0.8)
    late = (tmp_path / "late.txt").read_text()
    assert "Timeout" in late and "test_multiturn_benchmark_watchdog_dumps_where_a_run_hangs" in late
    with open(tmp_path / "ok.txt", "w") as f:
        with mtr.watchdog(0.3, file=f, end=False):
            pass
        time.sleep(0.6)
    assert (tmp_path / "ok.txt").read_text() == ""


def test_multiturn_benchmark_step_bounds_by_hand():
    """benchmarks/multiturn_rollout.py's decode-step bounds on hand-made plans: the turn-synchronous loop pays each
    batch's longest turn (rounded up to the check interval) per round; the no-barrier loop at least total / slots
    and its longest episode, and, with episodes started in order as slots free up, the schedule's tail."""
    mtr = _multiturn_benchmark()
    keys = ["a", "b", "c"]
    plan = {"a": (1, [4, 8]), "b": (0, [2]), "c": (0, [6])}
    got = mtr.step_bounds(plan, keys, slots=2, check=4)
    # round 0: [4, 2] -> 4, [6] -> 8; round 1: [8] -> 8.  total 20 tokens / 2 slots = 10 < longest episode 12.
    # in order: a on slot 1 until 12, b on slot 2 until 2, c there until 8 -> 12
    assert got == {"turn_synchronous_steps": 20, "no_barrier_steps": 12, "ratio": 1.67,
                   "no_barrier_in_order_steps": 12, "ratio_in_order": 1.67}
    plan = {"a": (0, [2]), "b": (0, [2]), "c": (0, [10])}  # the long episode starts last: the tail
    got = mtr.step_bounds(plan, keys, slots=2, check=1)
    assert got["turn_synchronous_steps"] == 12 and got["no_barrier_steps"] == 10
    assert got["no_barrier_in_order_steps"] == 12 and got["ratio_in_order"] == 1.0


def test_recipe_scheduling_keys_reach_the_streaming_engine(tiny_bundle):
    """engine.prefill_overlap / prefill_min / prefill_wait / prefill_cover / prefill_graphs / prefill_eager /
    vision_graphs / vision_ahead / prepare_threads / launch_before_collect set the streaming engine's scheduling; left
    at None they keep its defaults; values
    below 1 are recipe errors naming the key.
    engine.share_prompts (default off) reaches both HF engines."""
    from vigorl_cli.engines.factory import hf_engine
    from vigorl_cli.errors import RecipeError
    from vigorl_cli.recipe import load_recipe

    plain = hf_engine(tiny_bundle, load_recipe(None, ["engine.continuous_batching=true",
                                                      "engine.batch_size=8"]).engine)
    assert (plain.overlap, plain.prefill_min, plain.PREFILL_WAIT, plain.PREFILL_COVER,
            plain.prefill_graphs, plain.share_prompts) == (False, 2, 4, 16, False, False)
    r = load_recipe(None, ["engine.continuous_batching=true", "engine.batch_size=8", "engine.prefill_overlap=true",
                           "engine.prefill_min=3", "engine.prefill_wait=8", "engine.prefill_cover=24",
                           "engine.prefill_graphs=true", "engine.share_prompts=true", "engine.prefill_eager=true",
                           "engine.vision_graphs=true", "engine.vision_ahead=true", "engine.prepare_threads=3",
                           "engine.launch_before_collect=true"])
    eng = hf_engine(tiny_bundle, r.engine)
    assert eng.prepare_threads == 3 and plain.prepare_threads == 0
    assert eng.launch_before_collect is True and plain.launch_before_collect is False
    assert (eng.overlap, eng.prefill_min, eng.PREFILL_WAIT, eng.PREFILL_COVER, eng.prefill_graphs,
            eng.share_prompts, eng.prefill_eager, eng.vision_graphs, eng.vision_ahead) == (True, 3, 8, 24, True, True,
                                                                                             True, True, True)
    assert plain.prefill_eager is False and plain.vision_graphs is False and plain.vision_ahead is False
    static = hf_engine(tiny_bundle, load_recipe(None, ["engine.static_cache=true", "engine.share_prompts=true"]).engine)
    assert type(static) is HFEngine and static.share_prompts is True
    assert HFStreamingEngine.PREFILL_WAIT == 4 and HFStreamingEngine.PREFILL_COVER == 16  # the class is untouched
    with pytest.raises(RecipeError, match="engine.prefill_wait"):
        load_recipe(None, ["engine.prefill_wait=0"])
    with pytest.raises(RecipeError, match="engine.prepare_threads"):
        load_recipe(None, ["engine.prepare_threads=-1"])


def test_prefill_buckets_by_hand():
    """Rows to a power of two (at most the slots; with ``row_step`` k, past k to a multiple of k), fed width to 64 /
    96 / 128 / 192 / ..., cache read to a multiple of READ_BUCKET (at most the cache and its dump column)."""
    from vigorl_cli.engines.hf_stream import _PrefillGraphs, bucket_width

    assert [bucket_width(w) for w in (1, 64, 65, 96, 97, 128, 129, 200, 385, 700, 1025)] == \
        [64, 64, 96, 96, 128, 128, 192, 256, 512, 768, 1536]
    g = _PrefillGraphs(torch.nn.Linear(1, 1), slots=24, cache_len=4096, read_bucket=512)
    assert g.bucket(1, 10, 10) == (1, 64, 512)
    assert g.bucket(3, 100, 513) == (4, 128, 1024)
    assert g.bucket(17, 300, 4000) == (24, 384, 4096)  # 32 rows > 24 slots
    assert _PrefillGraphs(torch.nn.Linear(1, 1), 8, 1000, 0).bucket(8, 64, 5) == (8, 64, 1001)
    fine = _PrefillGraphs(torch.nn.Linear(1, 1), slots=32, cache_len=4096, read_bucket=512, row_step=4)
    assert [fine.bucket(n, 64, 1)[0] for n in (1, 3, 4, 5, 9, 12, 13, 31, 32)] == [1, 4, 4, 8, 12, 12, 16, 32, 32]
    assert [g.bucket(n, 64, 1)[0] for n in (5, 9, 13)] == [8, 16, 16]  # powers of two


@pytest.mark.parametrize("overlap", [False, True])
def test_identical_prompts_in_one_prefill_are_fed_once(tiny_bundle, overlap):
    """A GRPO group (four single-sample requests with the same prompt and image key) and a request with n=3 start
    together with a different request: the prefill feeds one row per distinct prompt (3 rows), the other slots copy
    its keys and values, and every sample equals generate's (tokens, raw log-probs). An episode's next turn submitted
    twice (one continues its parked slot) is fed only as that slot's new tokens; the other copies the whole prompt.
    The same with ``overlap`` (the prefill beside the decode; its rows join a chunk later)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=8, cache_len=1024, max_new_cap=32)
    eng.overlap, eng.share_prompts = overlap, True
    group = []
    for k in range(4):
        r = _req(tiny_bundle, "What colour is it?", IM1, seed=10 + k, max_new_tokens=12, key="g/full")
        group.append(r)
    many = _req(tiny_bundle, "Another one", IM2, seed=4, max_new_tokens=9, n=3)
    other = _req(tiny_bundle, "Where is the dog in this much longer question?", IM2, seed=5, max_new_tokens=7)
    reqs = group + [many, other]
    for i, r in enumerate(reqs):
        eng.submit(r, i)
    fed = []
    original = eng.model.forward

    def spy(*a, **kw):
        fed.append(tuple(kw["input_ids"].shape))
        return original(*a, **kw)

    eng.model.forward = spy
    try:
        got, _ = _drain(eng)
    finally:
        del eng.model.forward
    prefills = [s for s in fed if s[1] > 1]
    assert len(prefills) == 1 and prefills[0][0] == 3  # 8 samples, 3 distinct prompts
    lens = [len(eng.expand(r.prompt_ids, eng.encode_images(r.images)[1])) for r in (group[0], many)]
    assert eng.shared_tokens == 3 * lens[0] + 2 * lens[1]
    gen = HFEngine(tiny_bundle, batch_size=8)  # dynamic cache: every row fed
    for i, r in enumerate(reqs):
        want = gen.generate([r])[0]
        for w, g in zip(want, got[i], strict=True):
            assert g.token_ids == w.token_ids, i
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4), i

    second = _next_turn(tiny_bundle, group[0], got[0][0], IM2, "g/crop")
    twin = GenerationRequest(second.prompt_ids, second.images, SamplingParams(seed=77, max_new_tokens=9),
                             image_keys=second.image_keys)
    shared, reused, fed[:] = eng.shared_tokens, eng.reused_tokens, []
    eng.model.forward = spy
    try:
        eng.submit(second, "a")
        eng.submit(twin, "b")
        got2, _ = _drain(eng)
    finally:
        del eng.model.forward
    held = lens[0] + len(got[0][0].token_ids)  # turn 1's prompt and completion, in its parked slot
    total = len(eng.expand(second.prompt_ids, eng.encode_images(second.images)[1]))
    # one row fed: the new tokens of the slot that held turn 1 (the twin, in a group member's parked slot, would
    # have reused at most turn 1's prompt and a common start of the completions)
    assert [s for s in fed if s[1] > 1] == [(1, total - held)]
    assert eng.reused_tokens - reused == held and 0 < eng.shared_tokens - shared <= total - lens[0]
    _equal_generate(tiny_bundle, got2, {"a": second, "b": twin}, logprobs=True)

    eng.share_prompts = False  # off: every row is fed
    shared, fed[:] = eng.shared_tokens, []
    eng.model.forward = spy
    try:
        eng.submit(group[1], "c")
        eng.submit(group[2], "d")
        got3, _ = _drain(eng)
    finally:
        del eng.model.forward
    # two rows, each feeding the last prompt token (group members' parked slots hold the rest)
    assert fed[0] == (2, 1) and eng.shared_tokens == shared
    _equal_generate(tiny_bundle, got3, {"c": group[1], "d": group[2]}, logprobs=True)


@pytest.mark.parametrize("plain", [False, True])
def test_prefill_eager_sets_the_compiled_blocks_aside_for_prefills_only(tiny_bundle, plain):
    """With model.compile's blocks installed (models/compile.py: a per-module ``forward`` override; counted here),
    ``prefill_eager`` runs every prefill through the modules' own code and the decode steps through the compiled
    ones; without it both use them. The samples are generate's either way, and the overrides stay installed."""
    from vigorl_cli.models import compile as C

    calls = {"prefill": 0, "decode": 0}

    def counting(mod):
        def forward(x, *a, **kw):
            calls["decode" if x.dim() == 3 and x.shape[1] == 1 else "prefill"] += 1
            return type(mod).forward(mod, x, *a, **kw)
        return forward

    targets = C.compile_targets(tiny_bundle.model)
    for m in targets:
        m.forward = counting(m)
    try:
        eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=16)
        eng.prefill_eager = plain
        reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=10),
                _req(tiny_bundle, "x", IM2, seed=2, max_new_tokens=6)]
        for i, r in enumerate(reqs):
            eng.submit(r, i)
        got, _ = _drain(eng)
        assert calls["decode"] > 0 and (calls["prefill"] == 0) == plain
        assert C.is_compiled(tiny_bundle.model)
    finally:
        C.uncompile(tiny_bundle.model)
    _equal_generate(tiny_bundle, got, dict(enumerate(reqs)), logprobs=True)


@pytest.mark.parametrize("stale", [False, True])
def test_prefill_graph_replays_are_checked_against_the_eager_forward(tiny_bundle, monkeypatch, stale):
    """prefill_graphs with a stand-in capture (CUDA-graph semantics: the bucket's static inputs read at each replay,
    one output buffer): buckets that come back are captured and replayed, and samples equal generate's. A graph
    whose first replay differs from the eager forward of the same inputs (``stale``: it replays its capture-time
    output) is dropped, graphs are turned off with a warning, and the samples still equal generate's."""
    import contextlib
    import warnings

    from vigorl_cli.engines.hf_stream import _PrefillGraphs

    def capture(self, original, cache, inputs):
        out = self._run(original, cache, inputs)
        frozen = out.clone()

        class Graph:
            def replay(self_):
                out.copy_(frozen * 3 + 1 if stale else self._run(original, cache, inputs))

        return Graph(), out

    real = HFStreamingEngine._graphed_lm

    @contextlib.contextmanager
    def graphed(self, cache):
        with real(self, cache):
            g = self._lm_graphs
            g.use_graphs = g.capture_error is None  # as on a GPU
            yield

    monkeypatch.setattr(_PrefillGraphs, "_capture", capture)
    monkeypatch.setattr(HFStreamingEngine, "_graphed_lm", graphed)
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=512, max_new_cap=8)
    eng.prefill_graphs = True
    gen = HFEngine(tiny_bundle, batch_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for wave in range(4):
            reqs = [_req(tiny_bundle, "What colour is it?", IM1, seed=10 * wave + 1, max_new_tokens=6),
                    _req(tiny_bundle, "count the boxes", IM2, seed=10 * wave + 2, max_new_tokens=6)]
            for i, r in enumerate(reqs):
                eng.submit(r, i)
            got, _ = _drain(eng)
            _equal_generate(tiny_bundle, got, dict(enumerate(reqs)), logprobs=True)
    g = eng._lm_graphs
    msgs = [str(w.message) for w in caught if "prefill graphs" in str(w.message)]
    if stale:
        assert g.replays == 0 and not g.graphs and "replay differed" in g.capture_error and len(msgs) == 1
    else:
        assert g.captures > 0 and g.replays > 0 and g.capture_error is None and not msgs


@pytest.mark.parametrize("pipeline,towers", [(False, False), (True, False), (True, True)])
def test_images_are_encoded_ahead_of_their_prefill(tiny_bundle, monkeypatch, pipeline, towers):
    """engine.vision_ahead: at the start of a poll the new images of waiting requests (first-turn images, a next
    turn's crop) go through the vision tower, each distinct key once, into the feature cache, and no prefill runs
    the tower for them; samples and log-probs equal generate's. After the tower's weights change (a version bump)
    an image seen before is neither served from the cache nor encodable ahead (its pixels were not kept): its
    prefill encodes it. Also with ``pipeline`` (the next turn arrives while a chunk is in flight) and with
    ``vision_graphs`` (the ahead tower has graphs of its own)."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    eng.vision_ahead, eng.pipeline, eng.vision_graphs = True, pipeline, towers
    visual = eng.model.model.visual
    calls: list[tuple[bool, int]] = []  # (inside _encode_ahead, images)
    inside = [False]
    real_forward, real_ahead = visual.forward, eng._encode_ahead

    def forward(hidden_states, grid_thw=None, **kw):
        calls.append((inside[0], int(grid_thw.shape[0])))
        return real_forward(hidden_states, grid_thw, **kw)

    def ahead():
        inside[0] = True
        try:
            real_ahead()
        finally:
            inside[0] = False

    monkeypatch.setattr(visual, "forward", forward)
    monkeypatch.setattr(eng, "_encode_ahead", ahead)
    a = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=6, key="a/full")
    twin = _req(tiny_bundle, "What colour is it now?", IM1, seed=2, max_new_tokens=9, key="a/full")  # a group's
    b = _req(tiny_bundle, "x", IM2, seed=3, max_new_tokens=12, key="b/full")
    for tag, r in (("a", a), ("twin", twin), ("b", b)):
        eng.submit(r, tag)
    got, _ = _drain(eng)
    nxt = _next_turn(tiny_bundle, a, got["a"][0], IM2, "a/crop-1")
    eng.submit(nxt, "a2")
    got.update(_drain(eng)[0])
    assert all(where for where, _ in calls) and sum(n for _, n in calls) == 3  # a/full, b/full, a/crop-1
    assert eng.ahead_images == 3 and eng.prefill_images == 0 and eng.prefills >= 2
    _equal_generate(tiny_bundle, got, {"a": a, "twin": twin, "b": b, "a2": nxt}, logprobs=True)
    assert (eng._ahead_towers is not None and eng._ahead_towers.eager > 0) == towers
    if towers:  # captured on streams of their own: they replay beside the decode (static_decode.capture_stream)
        lanes = {eng._ahead_towers.lane, eng._towers().lane, eng._lane, eng._decoder.lane}
        assert len(lanes) == 4

    with torch.no_grad():  # new weights (same values): cached features are stale
        next(visual.parameters()).add_(0)
    calls.clear()
    again = _req(tiny_bundle, "Again?", IM1, seed=4, max_new_tokens=5, key="a/full")
    eng.submit(again, "again")
    got = _drain(eng)[0]
    assert calls == [(False, 1)] and eng.ahead_images == 3 and eng.prefill_images == 1  # encoded by its prefill
    _equal_generate(tiny_bundle, got, {"again": again}, logprobs=True)


def test_images_encoded_ahead_wait_for_the_callers_work_not_for_the_chunk(tiny_bundle, monkeypatch):
    """The stream order of engine.vision_ahead on a GPU, with torch.cuda's streams and events stood in for on CPU:
    with a pipelined decode chunk in flight the stream ahead waits only for the event recorded on the caller's
    stream just before that chunk (so it runs beside the chunk, and after any weight update queued before it);
    with nothing in flight it waits for the caller's whole stream; a prefill that feeds features encoded ahead
    waits for the stream ahead and marks their memory as used by its own stream; generate() and abort() wait for
    it too (and marks the cached features it reads). Samples still equal generate's."""
    import contextlib

    log: list[tuple] = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, ev):
            log.append((self.name, "wait_event", ev.name))

        def wait_stream(self, other):
            log.append((self.name, "wait_stream", other.name))

    class Event:
        made = 0

        def __init__(self):
            Event.made += 1
            self.name = f"chunk{Event.made}"

        def record(self, stream):
            log.append((stream.name, "record", self.name))

    caller, side = Stream("caller"), Stream("ahead")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append((s.name, "record_stream")),
                        raising=False)
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=32)
    eng.vision_ahead, eng.pipeline = True, True
    monkeypatch.setattr(eng, "_ahead_stream", lambda: setattr(eng, "_ahead_stream_", side) or side)
    a = _req(tiny_bundle, "What colour is it?", IM1, seed=1, max_new_tokens=4, key="a/full")
    long = _req(tiny_bundle, "x", IM2, seed=2, max_new_tokens=30, key="b/full")
    eng.submit(a, "a")
    eng.submit(long, "long")
    got: dict = {}
    while "a" not in got:
        got.update(dict(eng.poll()))
    # nothing in flight yet: the stream ahead waits for the caller's; the prefill then for it, and both features
    # (encoded ahead) are marked as read on the prefill's stream; then the first pipelined chunk's event
    assert log[:5] == [("ahead", "wait_stream", "caller"), ("caller", "wait_stream", "ahead"),
                       ("caller", "record_stream"), ("caller", "record_stream"), ("caller", "record", "chunk1")]
    assert eng._chunk  # "long" decodes on: a chunk is in flight when a's next turn comes
    log.clear()
    nxt = _next_turn(tiny_bundle, a, got["a"][0], IM2, "a/crop-1")
    eng.submit(nxt, "a2")
    chunk = eng._chunk_event.name  # recorded just before the chunk in flight
    eng.poll()
    assert log[0] == ("ahead", "wait_event", chunk)  # not wait_stream(caller): that would wait for the chunk
    i = log.index(("caller", "wait_stream", "ahead"))  # the prefill of a2 (its crop was encoded ahead)
    assert ("caller", "record_stream") in log[i:] and eng.ahead_images == 3
    while eng.in_flight():
        got.update(dict(eng.poll()))
    log.clear()
    eng.generate([_req(tiny_bundle, "y", IM1, key="a/full", seed=5, max_new_tokens=2)])  # cached features
    assert log[0] == ("caller", "wait_stream", "ahead") and ("caller", "record_stream") in log
    log.clear()
    eng.abort()  # (what the caller does next, a weight update, comes after the tower's reads of the weights)
    assert log == [("caller", "wait_stream", "ahead")]
    monkeypatch.undo()
    _equal_generate(tiny_bundle, got, {"a": a, "long": long, "a2": nxt}, logprobs=True)


def test_prefill_graphs_are_not_replayed_beside_an_overlapped_decode(tiny_bundle, monkeypatch):
    """An H200 run with engine.prefill_overlap and engine.prefill_graphs hung (the collect after a replayed prefill
    graph beside the decode graphs never returned: docs/performance.md). With overlap the bucketed prefills run
    eagerly on a GPU, said once in a warning; without it they may replay graphs."""
    import warnings

    from vigorl_cli.engines.hf_stream import SlotCache

    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=64, max_new_cap=8)
    eng.prefill_graphs = True
    monkeypatch.setattr(type(eng.model), "device", property(lambda self: torch.device("cuda")))
    cache = SlotCache(2, 64, torch.device("cpu"))
    with eng._graphed_lm(cache):
        assert eng._lm_graphs.use_graphs
    eng.overlap = True
    with pytest.warns(UserWarning, match="no CUDA graphs with engine.prefill_overlap"), eng._graphed_lm(cache):
        assert not eng._lm_graphs.use_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with eng._graphed_lm(cache):  # said once
            assert not eng._lm_graphs.use_graphs
        eng.OVERLAP_PREFILL_GRAPHS = True  # (to check on a GPU whether the capture lanes fixed the hang)
        with eng._graphed_lm(cache):
            assert eng._lm_graphs.use_graphs and eng._lm_graphs.lane != eng._lane


def test_decode_graphs_outlive_a_drain_with_the_same_sampling_settings(tiny_bundle):
    """The slots' decode graphs bake in the sampling settings (temperature, top-p, top-k): after the slots drain (a
    rollout ends) the next request's settings replace them, and the graphs are dropped — all together, their lane's
    rule — only if those differ (a GRPO run's rollouts keep theirs instead of capturing again every step)."""
    from vigorl_cli.engines.static_decode import weight_addresses

    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=512, max_new_cap=8)
    for temp, kept in ((1.0, False), (1.0, True), (1.0, True), (0.7, False)):  # (the first sets them)
        sentinel = {64: object()}
        eng._graphs = dict(sentinel)
        eng._graph_weights = (weight_addresses(eng.model), eng.decode_backend)
        eng.submit(_req(tiny_bundle, "x", IM1, seed=1, max_new_tokens=4, temperature=temp), "r")
        _drain(eng)
        assert (eng._graphs == sentinel) == kept, temp


def test_images_ahead_per_poll_are_a_slots_worth(tiny_bundle):
    """engine.vision_ahead encodes the images of what the next prefills take: the latest requests (episodes' next
    turns) and a slot's worth of samples at the front of the queue, not those further back (a prefill waits for
    everything encoded ahead); those follow in later polls."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=512, max_new_cap=8)
    eng.vision_ahead = True
    reqs = {k: _req(tiny_bundle, "What colour is it?", im, key=k, seed=i, max_new_tokens=3, n=2 if k == "x" else 1)
            for i, (k, im) in enumerate((("x", IM1), ("y", IM2), ("z", IM1), ("w", IM2), ("v", IM1)))}
    for tag, r in reqs.items():  # x's two samples fill both slots: x at the front, v and w the latest (two slots)
        eng.submit(r, tag)
    got = dict(eng.poll())
    assert eng.ahead_images == 3 and set(eng._features) == {"x", "v", "w"} and eng.prefill_images == 0
    got.update(_drain(eng)[0])
    assert eng.ahead_images == 5 and eng.prefill_images == 0
    _equal_generate(tiny_bundle, got, reqs, logprobs=True)


def test_images_are_processed_in_the_background_from_submit(tiny_bundle, monkeypatch):
    """engine.prepare_threads: a submitted request's new images (string keys not seen yet) are processed in a
    background thread from submit on, each key once however many requests name it (a GRPO group); the main thread
    processes none of them; samples equal generate's. An image the processor fails on fails its request alone."""
    import threading

    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=16)
    eng.prepare_threads = 2
    where: list[str] = []
    real = eng.encode_images

    def encode(images):
        where.append(threading.current_thread().name)
        if any(isinstance(im, str) for im in images):
            raise ValueError("cannot read that image")
        return real(images)

    monkeypatch.setattr(eng, "encode_images", encode)
    reqs = {f"g{i}": _req(tiny_bundle, "What colour is it?", IM1, key="g/full", seed=i, max_new_tokens=5)
            for i in range(3)}
    reqs["o"] = _req(tiny_bundle, "x", IM2, key="o/full", seed=7, max_new_tokens=7)
    bad = _req(tiny_bundle, "x", IM2, key="bad/full", seed=8, max_new_tokens=7)
    bad.images = ["not an image"]
    for tag, r in [*reqs.items(), ("bad", bad)]:
        eng.submit(r, tag)
    got, _ = _drain(eng)
    eng.close()
    assert len(where) == 3 and all(w.startswith("vigorl-prepare") for w in where)  # g/full, o/full, bad/full
    assert got["bad"][0].finish_reason == "error" and "cannot read that image" in got["bad"][0].error
    _equal_generate(tiny_bundle, got, reqs, logprobs=True)


def test_launch_before_collect_keeps_the_schedule_and_the_samples(tiny_bundle):
    """``launch_before_collect`` (pipelined): the next chunk is launched before the one in flight is collected, from
    a host copy of its results. The same polls return the same completions, the same prefills and decode steps run
    (no chunk is launched once every row has finished); the samples are generate's. A
    small read bucket checks that the chunk launched ahead of the collect still attends to every written position
    (the steps in flight count towards its read width), and rows prefilled after the copy are not read from it."""
    gen = HFEngine(tiny_bundle, batch_size=8)
    texts = ["What colour is it?", "x", "Where is the dog in this much longer question?", "count the boxes"]
    runs = {}
    for behind in (False, True):
        eng = HFStreamingEngine(tiny_bundle, batch_size=3, cache_len=512, max_new_cap=40)
        eng.pipeline, eng.launch_before_collect, eng.READ_BUCKET = True, behind, 8
        reqs = [_req(tiny_bundle, texts[i % 4], [IM1, IM2, None][i % 3], seed=40 + i, max_new_tokens=5 + 7 * i % 36,
                     n=1 + (i % 4 == 1), stop=("e",) if i == 3 else ()) for i in range(9)]
        for i in range(4):
            eng.submit(reqs[i], i)
        nxt, log, got, polls = 4, [], {}, 0
        while eng.in_flight() or nxt < len(reqs):
            if polls % 2 and nxt < len(reqs):  # arrivals between polls
                eng.submit(reqs[nxt], nxt)
                nxt += 1
            for tag, comps in eng.poll():
                got[tag] = comps
                log.append((polls, tag))
            polls += 1
            assert polls < 500
        runs[behind] = (log, eng.prefills, eng.decode_steps, got, eng._snap is not None)
        if behind:
            for i, r in enumerate(reqs):
                want = gen.generate([r])[0]
                assert [c.token_ids for c in got[i]] == [c.token_ids for c in want], i
                assert torch.allclose(torch.tensor([x for c in got[i] for x in c.logprobs]),
                                      torch.tensor([x for c in want for x in c.logprobs]), atol=1e-4), i
    (log0, pf0, steps0, got0, snap0), (log1, pf1, steps1, got1, snap1) = runs[False], runs[True]
    assert log1 == log0 and pf1 == pf0 > 3
    def ids(got):
        return {t: [c.token_ids for c in v] for t, v in got.items()}

    assert ids(got1) == ids(got0)
    assert steps1 == steps0
    assert snap1 and not snap0  # (only the new mode copies results)


def test_reset_caches_starts_the_next_requests_cold(tiny_bundle):
    """reset_caches (what the benchmark calls between runs, as the vLLM engine's): no parked prefix is continued
    and no image feature or grid is remembered afterwards; the next turn is prefilled whole and still samples what
    generate samples."""
    eng = HFStreamingEngine(tiny_bundle, batch_size=2, cache_len=1024, max_new_cap=64)
    first, _ = _short_and_long(tiny_bundle)
    eng.submit(first, "t1")
    got = _drain(eng)[0]
    assert eng._parked and eng._features and eng._grids
    eng.reset_caches()
    assert not eng._parked and not eng._features and not eng._grids
    reused = eng.reused_tokens
    second, _ = _then_next_turn(tiny_bundle, eng, first, got)
    assert eng.reused_tokens == reused  # fed whole: nothing parked to continue
    _equal_generate(tiny_bundle, got, {"t2": second})
