"""Packed rows attend per sample in one causal sdpa call (models/packed_attention.py), equal to HF's block mask."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vigorl_cli.models.load import load_model
from vigorl_cli.models.packed_attention import (
    IMPL,
    install_packed_attention,
    packed_segments,
    plan_from_positions,
    uses_packed_attention,
)
from vigorl_cli.train.batching import Collator, LogProbModel, encode_conversation, rope_index_of


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    out = []
    for i, (size, color) in enumerate((((120, 60), (200, 40, 40)), ((56, 112), (40, 200, 40)),
                                       ((300, 220), (40, 40, 200)))):
        Image.new("RGB", size, color).save(d / f"{i}.png")
        out.append(d / f"{i}.png")
    return out


def _examples(bundle, imgs):
    p = bundle.processor
    turn = [{"role": "user", "content": "<image>\nWhere is it?"},
            {"role": "assistant", "content": "<think> look (10, 20) </think>"},
            {"role": "user", "content": "<observation>\n<image>\n</observation>"},
            {"role": "assistant", "content": "<answer> left </answer>"}]
    return [encode_conversation(p, turn, imgs[:2], 4096, id="a"),
            encode_conversation(p, [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
                                [], 4096, id="b"),
            encode_conversation(p, [{"role": "user", "content": "<image> colour?"},
                                    {"role": "assistant", "content": "blue"}], [imgs[2]], 4096, id="c")]


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logp = model(**batch.model_inputs())
    loss = -logp.sum() / batch.n_targets
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), float(loss.detach()), grads


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_packed_attention_equals_hf_block_mask_forward_and_backward(name, imgs):
    bundle = load_model(name)
    exs = _examples(bundle, imgs)
    batch = Collator(bundle.processor, bundle.model.config, rope_index_of(bundle.model), packing=True)(exs)
    hf_path = LogProbModel(bundle.model, packed_attention=False)  # HF sdpa: block-diagonal T×T mask
    assert not uses_packed_attention(bundle.model)
    ref = _loss_and_grads(hf_path, batch)
    ours = LogProbModel(bundle.model)
    assert uses_packed_attention(bundle.model)
    got = _loss_and_grads(ours, batch)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert got[1] == pytest.approx(ref[1], rel=1e-6)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) > 10
    for n in ref[2]:
        assert torch.allclose(got[2][n], ref[2][n], atol=1e-5, rtol=1e-4), n
    # and each packed sample equals that sample alone, unpacked
    for ex, lp in zip(exs, batch.per_example(got[0]), strict=True):
        one = Collator(bundle.processor, bundle.model.config, rope_index_of(bundle.model), packing=False)([ex])
        with torch.no_grad():
            alone = ours(**one.model_inputs())[0]
        assert torch.allclose(lp, alone, atol=1e-5), ex.id


def test_gradient_checkpointing_recomputes_packed_attention_per_sample(imgs):
    """The recompute in backward runs outside the forward's Python context: the plan must travel with the layer's
    arguments, or the recompute attends across samples (the checkpoint then sees different saved tensors)."""
    bundle = load_model("tiny-qwen2.5-vl")
    exs = _examples(bundle, imgs)
    batch = Collator(bundle.processor, bundle.model.config, rope_index_of(bundle.model), packing=True)(exs)
    ref = _loss_and_grads(LogProbModel(bundle.model, packed_attention=False), batch)  # HF block mask, no checkpoint
    bundle.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bundle.model.disable_input_require_grads()
    bundle.model.train()
    got = _loss_and_grads(LogProbModel(bundle.model), batch)
    assert got[1] == pytest.approx(ref[1], rel=1e-6)
    for n in ref[2]:
        assert torch.allclose(got[2][n], ref[2][n], atol=1e-5, rtol=1e-4), n


def test_no_mask_is_built_and_attention_is_one_causal_call_per_layer(imgs, monkeypatch):
    import transformers.masking_utils as mu

    bundle = load_model("tiny-qwen2.5-vl")
    model = LogProbModel(bundle.model).eval()
    batch = Collator(bundle.processor, bundle.model.config, rope_index_of(bundle.model), packing=True)(
        _examples(bundle, imgs))
    masks, calls = [], []
    real_mask, real_sdpa = mu.sdpa_mask, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: masks.append(1) or real_mask(*a, **k))

    def sdpa(q, *a, **k):
        calls.append((tuple(q.shape), k.get("is_causal"), k.get("attn_mask")))
        return real_sdpa(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        model(**batch.model_inputs())
    layers = bundle.model.config.text_config.num_hidden_layers
    text_calls = [c for c in calls if c[1]]
    assert masks == [] and len(text_calls) == layers  # no T×T mask; one causal call per decoder layer
    longest = max(batch.seq_lens)
    assert all(c[0][0] == 3 and c[0][2] == longest and c[2] is None for c in text_calls)  # [segments, H, longest, D]


def test_plan_from_positions_and_unpacked_forwards_are_untouched(tiny_bundle, tmp_path):
    plan = plan_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert (plan.segments, plan.longest, plan.total) == (3, 4, 9)
    assert plan.slot.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11]
    with pytest.raises(ValueError):
        plan_from_positions(torch.tensor([1, 2, 0]))
    # unpacked: the same numbers through vigorl_sdpa as through HF's sdpa, even inside a stray plan of another size
    model = tiny_bundle.model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])).logits
        assert install_packed_attention(model)
        with packed_segments(torch.tensor([0, 1, 2])):
            after = model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]])).logits
    assert torch.allclose(before, after, atol=1e-6)
    model.save_pretrained(tmp_path)
    assert IMPL not in (tmp_path / "config.json").read_text()  # a runtime switch, never saved


def test_eager_models_are_left_alone():
    b = load_model("tiny-qwen2.5-vl", attn_implementation="eager")
    assert not install_packed_attention(b.model) and not uses_packed_attention(b.model)
    assert b.model.config.text_config._attn_implementation == "eager"


def test_without_a_plan_the_attention_is_traceable_in_one_graph(tiny_bundle):
    """A compiled decode step (engine.static_cache) over a policy switched to vigorl_sdpa must not break its graph at
    every layer: only the packed branch runs eagerly."""
    from transformers import AttentionInterface

    install_packed_attention(tiny_bundle.model)
    attn = tiny_bundle.model.model.language_model.layers[0].self_attn
    fn = AttentionInterface()[IMPL]
    q = torch.randn(2, attn.config.num_attention_heads, 5, attn.head_dim)
    k = torch.randn(2, attn.config.num_key_value_heads, 5, attn.head_dim)

    def f(q, k, v):
        return fn(attn, q, k, v, None, scaling=attn.scaling)[0]

    explained = torch._dynamo.explain(f)(q, k, k.clone())
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    plan = plan_from_positions(torch.tensor([0, 1, 2, 0, 1]))
    out = fn(attn, q[:1], k[:1], k[:1].clone(), None, scaling=attn.scaling, vigorl_packed_plan=plan)[0]
    assert out.shape == (1, 5, attn.config.num_attention_heads, attn.head_dim)
