"""The vision tower per group of same-grid images, as CUDA graphs on a GPU (models/vision_graphs.py).

On CPU there are no CUDA graphs; a stand-in capture keeps their semantics (inputs read from static buffers at each
replay, the output written into one buffer that the next replay overwrites), so the bookkeeping around them —
keys, static copies, the features handed back, recapture after a weight move — is tested here, with real numerics."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vigorl_cli.engines.base import GenerationRequest, SamplingParams
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.engines.hf_stream import HFStreamingEngine
from vigorl_cli.models.vision_graphs import TowerGraphs, _pooled


def _fake_capture(self, tower, static, grid, kw):
    out = _pooled(tower(static, grid, **kw)).clone()  # the graph's output buffer

    class Graph:
        def replay(self):
            out.copy_(_pooled(tower(static, grid, **kw)))

    return Graph(), out


def _images(seed: int):
    rng = torch.Generator().manual_seed(seed)

    def im(w, h):
        return Image.fromarray((torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy())

    return [im(112, 84), im(56, 140), im(112, 84)]  # two crops of one size, another image between them


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def test_groups_and_graph_replays_give_the_towers_features(tiny_bundle, monkeypatch, name):
    """Images of one grid form a group (here images 0 and 2), others their own: each image's features equal one
    eager call over all images (Qwen2.5-VL's windowed tower and Qwen2-VL's). A key seen before is captured, then
    replayed for new pixels; the features handed back are copies (an earlier call's stay intact after later
    replays); moved weights mean capturing again."""
    from vigorl_cli.models.load import load_model

    monkeypatch.setattr(TowerGraphs, "_capture", _fake_capture)
    bundle = tiny_bundle if name == "tiny-qwen2.5-vl" else load_model(name)
    eng = HFEngine(bundle)
    visual = bundle.model.model.visual
    tg = TowerGraphs(visual)
    tg.use_graphs = True
    outs, refs = [], []
    for call in range(4):
        pv, grid = eng.encode_images(_images(call))
        pv = pv.to(visual.dtype)
        with torch.no_grad():
            ref = visual(pv, grid_thw=grid).pooler_output
            got = tg(visual.forward, pv, grid).pooler_output
        outs.append(got)
        refs.append(ref.clone())
        assert torch.allclose(got, ref, atol=1e-5), call
        if call == 0:
            assert (tg.eager, tg.captures, tg.replays) == (2, 0, 0)  # two groups, first sight of each key
        if call == 1:
            assert (tg.captures, tg.replays) == (2, 0)  # both keys captured (and run once)
        if call == 2:
            assert (tg.captures, tg.replays) == (2, 2)
    for got, ref in zip(outs, refs):
        assert torch.equal(got, ref) or torch.allclose(got, ref, atol=1e-5)  # not overwritten by later replays
    p = next(visual.parameters())
    p.data = p.data.clone()  # new storage: captured graphs would read the old addresses
    pv, grid = eng.encode_images(_images(9))
    with torch.no_grad():
        tg(visual.forward, pv.to(visual.dtype), grid)
    assert tg.captures == 4 and tg.replays == 4


def _req(bundle, text, images, seed, keys):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = bundle.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
    ids = bundle.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, images, SamplingParams(seed=seed, max_new_tokens=8), image_keys=keys)


def test_streaming_prefills_with_vision_graphs_sample_what_generate_samples(tiny_bundle, monkeypatch):
    """engine.vision_graphs: prefills whose new images include several of one size (zoom crops) run the tower per
    group — replaying a (stand-in) graph once a group's key came back — and every sample equals generate's."""
    monkeypatch.setattr(TowerGraphs, "_capture", _fake_capture)
    original = HFStreamingEngine._towers

    def towers(self):
        tg = original(self)
        if tg is not None:
            tg.use_graphs = True  # as on a GPU
        return tg

    monkeypatch.setattr(HFStreamingEngine, "_towers", towers)
    eng = HFStreamingEngine(tiny_bundle, batch_size=4, cache_len=1024, max_new_cap=16)
    eng.vision_graphs = True
    gen = HFEngine(tiny_bundle, batch_size=8)
    for wave in range(3):
        ims = _images(10 + wave)
        reqs = [_req(tiny_bundle, f"look {i}", [ims[1], ims[0 if i % 2 else 2]], seed=10 * wave + i,
                     keys=[f"w{wave}/full", f"w{wave}/crop{i % 2}"]) for i in range(4)]
        for i, r in enumerate(reqs):
            eng.submit(r, i)
        got = {}
        while eng.in_flight():
            got.update(eng.poll())
        for i, r in enumerate(reqs):
            want = gen.generate([r])[0][0]
            assert got[i][0].token_ids == want.token_ids, (wave, i)
            assert torch.allclose(torch.tensor(got[i][0].logprobs), torch.tensor(want.logprobs), atol=1e-4)
    tg = eng._tower_graphs
    assert tg is not None and tg.captures > 0 and tg.replays > 0


def test_a_replay_that_differs_from_the_eager_tower_turns_the_graphs_off(tiny_bundle, monkeypatch):
    """Each new graph's first replay is compared with the eager tower on the same inputs: a graph that reads stale
    inputs (here: one that keeps replaying its capture-time pixels' features) is dropped, the graphs are turned off
    with a warning naming the difference, and the features handed back are the eager ones."""
    def stale_capture(self, tower, static, grid, kw):
        out = _pooled(tower(static, grid, **kw)).clone()
        frozen = out.clone()

        class Graph:
            def replay(self):
                out.copy_(frozen * 3 + 1)  # not what the tower computes for the new pixels

        return Graph(), out

    monkeypatch.setattr(TowerGraphs, "_capture", stale_capture)
    eng = HFEngine(tiny_bundle)
    visual = tiny_bundle.model.model.visual
    tg = TowerGraphs(visual)
    tg.use_graphs = True
    for call in range(3):
        pv, grid = eng.encode_images(_images(20 + call))
        pv = pv.to(visual.dtype)
        with torch.no_grad():
            ref = visual(pv, grid_thw=grid).pooler_output
            if call == 1:
                with pytest.warns(UserWarning, match="replay differed from the eager forward"):
                    got = tg(visual.forward, pv, grid).pooler_output
            else:
                got = tg(visual.forward, pv, grid).pooler_output
        assert torch.allclose(got, ref, atol=1e-5), call
    assert tg.captures == 0 and not tg.graphs and tg.use_graphs is False and "max abs diff" in tg.capture_error
