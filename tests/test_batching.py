"""Tokenizing SFT conversations, padded vs packed micro-batches, and the chunked log-prob head."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vigorl_cli.data.formats import SFTRecord
from vigorl_cli.train.batching import (
    IGNORE,
    Collator,
    Example,
    LogProbModel,
    SampleError,
    encode_conversation,
    image_token_count,
    prepare_sft,
    rope_index_of,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    out = {}
    for name, size, color in (("wide", (120, 60), (200, 40, 40)), ("tall", (56, 112), (40, 200, 40)),
                              ("big", (300, 220), (40, 40, 200))):
        Image.new("RGB", size, color).save(d / f"{name}.png")
        out[name] = d / f"{name}.png"
    return out


def _multiturn():
    return [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "<image>\nWhere is it?"},
        {"role": "assistant", "content": "<think> look (10, 20) </think>"},
        {"role": "user", "content": "<observation>\n<image>\n</observation>"},
        {"role": "assistant", "content": "<answer> left </answer>"},
    ]


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of labelled positions."""
    runs, start = [], None
    for i, t in enumerate(labels + [IGNORE]):
        if t != IGNORE and start is None:
            start = i
        if t == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _collator(bundle, packing, **kw):
    return Collator(bundle.processor, bundle.model.config, rope_index_of(bundle.model), packing=packing, **kw)


def test_labels_cover_exactly_the_assistant_replies_of_a_multiturn_dialog(tiny_bundle, images):
    tok = tiny_bundle.tokenizer
    ex = encode_conversation(tiny_bundle.processor, _multiturn(), [images["wide"], images["tall"]], 4096)
    runs = _runs(ex.labels)
    # Two assistant turns → two labelled runs, each the reply text plus its <|im_end|>, nothing else:
    # not the system/user/observation turns, not the "<|im_start|>assistant\n" header, not the "\n" after <|im_end|>.
    assert [tok.decode(ex.input_ids[a:b]) for a, b in runs] == ["<think> look (10, 20) </think><|im_end|>",
                                                                 "<answer> left </answer><|im_end|>"]
    for a, _ in runs:
        assert tok.decode(ex.input_ids[:a]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert all(ex.labels[i] == ex.input_ids[i] for a, b in runs for i in range(a, b))
    # Each <image> took the next image, expanded by its own grid: wide 120x60 and tall 56x112 give different counts.
    n_wide = image_token_count(tiny_bundle.processor, (120, 60))
    n_tall = image_token_count(tiny_bundle.processor, (56, 112))
    image_id = tiny_bundle.model.config.image_token_id
    pads = [i for i, t in enumerate(ex.input_ids) if t == image_id]
    assert len(pads) == n_wide + n_tall
    assert all(ex.labels[i] == IGNORE for i in pads)
    # The observation's image sits after the first reply, the question's before it.
    assert sum(1 for i in pads if i < runs[0][0]) == n_wide


def test_observation_role_is_masked_like_a_user_turn(tiny_bundle, images):
    msgs = _multiturn()
    msgs[3] = {"role": "observation", "content": "<image>\ncrop"}
    ex = encode_conversation(tiny_bundle.processor, msgs, [images["wide"], images["tall"]], 4096)
    assert len(_runs(ex.labels)) == 2
    assert "crop" not in tiny_bundle.tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_image_token_count_matches_the_processor_grid(tiny_bundle, images):
    ip = tiny_bundle.processor.image_processor
    for path in images.values():
        img = Image.open(path).convert("RGB")
        grid = ip(images=[img], return_tensors="pt")["image_grid_thw"][0]
        assert image_token_count(tiny_bundle.processor, img.size) == int(grid.prod()) // ip.merge_size ** 2


def test_unusable_samples_are_dropped_and_counted_by_kind(tiny_bundle, images, tmp_path):
    good = SFTRecord(id="ok", messages=_multiturn(), images=[str(images["wide"]), str(images["tall"])])
    records = [
        good,
        SFTRecord(id="count", messages=_multiturn(), images=[str(images["wide"])]),  # 2 <image>, 1 image
        SFTRecord(id="gone", messages=_multiturn(), images=[str(images["wide"]), "nope.png"]),
        SFTRecord(id="mute", messages=_multiturn()[:2], images=[str(images["wide"])]),  # no assistant turn
    ]
    prep = prepare_sft(records, tiny_bundle.processor, [tmp_path], max_seq_len=4096)
    assert [e.id for e in prep.examples] == ["ok"]
    assert dict(prep.dropped) == {"image_count": 1, "missing_image": 1, "no_assistant": 1}
    assert any("nope.png" in m for m in prep.messages)


def test_overlong_sample_is_dropped_whole_never_cut_through_its_image(tiny_bundle, images, tmp_path):
    msgs = [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "Blue."}]
    short = SFTRecord(id="short", messages=msgs, images=[str(images["wide"])])
    long_ = SFTRecord(id="long", messages=msgs, images=[str(images["big"])])  # many more image tokens
    n_short = len(encode_conversation(tiny_bundle.processor, msgs, [images["wide"]], 10_000))
    n_long = len(encode_conversation(tiny_bundle.processor, msgs, [images["big"]], 10_000))
    assert n_short < n_long
    prep = prepare_sft([short, long_], tiny_bundle.processor, [tmp_path], max_seq_len=n_long - 1)
    assert [e.id for e in prep.examples] == ["short"] and dict(prep.dropped) == {"too_long": 1}
    # what is kept still matches its image features (the crash other trainers hit after cutting an image span)
    batch = _collator(tiny_bundle, packing=True)(prep.examples)
    with torch.no_grad():
        LogProbModel(tiny_bundle.model)(**batch.model_inputs())


@pytest.fixture(scope="module")
def three_examples(tiny_bundle, images):
    p = tiny_bundle.processor
    text_only = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    return [encode_conversation(p, _multiturn(), [images["wide"], images["tall"]], 4096, id="a"),
            encode_conversation(p, text_only, [], 4096, id="b"),
            encode_conversation(p, [{"role": "user", "content": "<image> colour?"},
                                    {"role": "assistant", "content": "blue"}], [images["big"]], 4096, id="c")]


def test_packed_and_padded_logprobs_agree_with_a_plain_hf_forward(tiny_bundle, three_examples):
    model = LogProbModel(tiny_bundle.model).eval()
    per_layout = {}
    with torch.no_grad():
        for packing in (False, True):
            batch = _collator(tiny_bundle, packing)(three_examples)
            per_layout[packing] = batch.per_example(model(**batch.model_inputs()))
        assert batch.input_ids.shape == (1, sum(len(e) for e in three_examples))  # packed: one row, no padding
        for ex, padded, packed in zip(three_examples, per_layout[False], per_layout[True]):
            assert torch.allclose(padded, packed, atol=1e-5), ex.id
            # reference: HF computes its own M-RoPE positions for the sample alone, full logits, log_softmax
            one = _collator(tiny_bundle, False)([ex])
            logits = tiny_bundle.model(input_ids=one.input_ids, attention_mask=one.attention_mask,
                                       mm_token_type_ids=one.mm_token_type_ids, pixel_values=one.pixel_values,
                                       image_grid_thw=one.image_grid_thw).logits
            ref = torch.log_softmax(logits.float(), -1)[0].gather(-1, one.targets[0].clamp(min=0)[:, None])[:, 0]
            ref = ref.masked_fill(one.targets[0] == IGNORE, 0.0)
            assert torch.allclose(packed, ref, atol=1e-5), ex.id


def test_targets_are_shifted_within_each_packed_segment(tiny_bundle, three_examples):
    batch = _collator(tiny_bundle, True)(three_examples)
    for ex, tgt in zip(three_examples, batch.per_example(batch.targets)):
        assert tgt.tolist() == ex.labels[1:] + [IGNORE]  # the last token of a segment never predicts the next one
    assert batch.n_targets == sum(e.n_targets for e in three_examples)
    # row 0 of the packed positions restarts at 0 for every segment (transformers builds the block mask from it)
    starts = (batch.position_ids[0, 0] == 0).nonzero()[:, 0].tolist()
    assert starts == [0, len(three_examples[0]), len(three_examples[0]) + len(three_examples[1])]


def test_fake_image_segment_leaves_the_real_samples_unchanged(tiny_bundle, three_examples):
    text_only = [three_examples[1]]
    model = LogProbModel(tiny_bundle.model).eval()
    with torch.no_grad():
        for packing in (False, True):
            plain = _collator(tiny_bundle, packing)(text_only)
            faked = _collator(tiny_bundle, packing, fake_image_if_empty=True)(text_only)
            assert plain.pixel_values is None and faked.pixel_values is not None
            assert faked.n_targets == plain.n_targets and faked.seq_lens == plain.seq_lens
            a = plain.per_example(model(**plain.model_inputs()))[0]
            b = faked.per_example(model(**faked.model_inputs()))[0]
            assert torch.allclose(a, b, atol=1e-6)


def test_chunked_logprob_head_gives_the_same_loss_and_gradients_as_one_chunk(tiny_bundle, three_examples):
    batch = _collator(tiny_bundle, True)(three_examples)
    grads = []
    for chunk in (7, 10_000):
        model = LogProbModel(tiny_bundle.model, chunk_size=chunk)
        model.zero_grad()
        loss = -model(**batch.model_inputs()).sum()
        loss.backward()
        grads.append((float(loss.detach()), tiny_bundle.model.lm_head.weight.grad.clone(),
                      tiny_bundle.model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone()))
    tiny_bundle.model.zero_grad(set_to_none=True)
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6)


def test_entropy_is_returned_on_request_and_is_positive(tiny_bundle, three_examples):
    batch = _collator(tiny_bundle, False)(three_examples[:1])
    with torch.no_grad():
        logp, ent = LogProbModel(tiny_bundle.model)(**batch.model_inputs(), with_entropy=True)
    scored = batch.targets != IGNORE
    assert (ent[scored] > 0).all() and (logp[scored] < 0).all() and (ent[~scored] == 0).all()


def test_example_from_ids_masks_prompt_and_image_tokens(tiny_bundle):
    image_id = tiny_bundle.model.config.image_token_id
    ex = Example.from_ids("g", [1, image_id, 2, 3, 4], [False, True, False, True, True], image_token_id=image_id)
    assert ex.labels == [IGNORE, IGNORE, IGNORE, 3, 4] and ex.n_targets == 2


def test_sample_error_kinds_are_raised_for_a_bad_template_order(tiny_bundle):
    with pytest.raises(SampleError) as e:
        encode_conversation(tiny_bundle.processor, [{"role": "assistant", "content": "hi"}], [], 100)
    assert e.value.kind == "no_prompt"


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_packing_matches_a_plain_hf_forward_for_qwen2_vl_and_qwen3_vl(name, images):
    from vigorl_cli.models.load import load_model

    b = load_model(name)
    msgs = [{"role": "user", "content": "<image> colour?"}, {"role": "assistant", "content": "blue"}]
    exs = [encode_conversation(b.processor, _multiturn(), [images["wide"], images["tall"]], 4096),
           encode_conversation(b.processor, msgs, [images["big"]], 4096)]
    model = LogProbModel(b.model).eval()
    with torch.no_grad():
        packed = _collator(b, True)(exs)
        got = packed.per_example(model(**packed.model_inputs()))
        for ex, lp in zip(exs, got, strict=True):
            one = _collator(b, False)([ex])
            logits = b.model(input_ids=one.input_ids, attention_mask=one.attention_mask,
                             mm_token_type_ids=one.mm_token_type_ids, pixel_values=one.pixel_values,
                             image_grid_thw=one.image_grid_thw).logits
            ref = torch.log_softmax(logits.float(), -1)[0].gather(-1, one.targets[0].clamp(min=0)[:, None])[:, 0]
            assert torch.allclose(lp, ref.masked_fill(one.targets[0] == IGNORE, 0.0), atol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_an_image_shown_by_several_examples_is_encoded_once_with_equal_logprobs_and_grads(tiny_bundle, images,
                                                                                            packing):
    """A GRPO group's responses share their prompt's image: the micro-batch carries its pixels once, the vision tower
    encodes it once, and log-probs and gradients are those of encoding every occurrence."""
    from PIL import Image as PILImage

    p = tiny_bundle.processor
    shared = PILImage.open(images["big"]).convert("RGB")
    msgs = [{"role": "user", "content": "<image> colour?"}, {"role": "assistant", "content": "blue"}]
    exs = [encode_conversation(p, msgs, [shared], 4096, id="g0"),
           encode_conversation(p, [{"role": "user", "content": "<image> colour?"},
                                   {"role": "assistant", "content": "red, maybe"}], [shared], 4096, id="g1"),
           encode_conversation(p, _multiturn(), [images["wide"], images["wide"]], 4096, id="same-path-twice")]
    model = LogProbModel(tiny_bundle.model)
    results = {}
    for dedupe in (True, False):
        batch = _collator(tiny_bundle, packing, dedupe_images=dedupe)(exs)
        model.zero_grad(set_to_none=True)
        logp = model(**batch.model_inputs())
        (-logp.sum()).backward()
        results[dedupe] = (batch, logp.detach(), tiny_bundle.model.lm_head.weight.grad.clone(),
                           tiny_bundle.model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    deduped, full = results[True][0], results[False][0]
    assert deduped.image_occurrence == [0, 0, 1, 1] and deduped.grid_unique.shape[0] == 2
    assert deduped.image_grid_thw.shape[0] == 4 and torch.equal(deduped.image_grid_thw, full.image_grid_thw)
    assert deduped.pixel_values.shape[0] * 2 == full.pixel_values.shape[0]  # two distinct images of two each
    assert full.image_occurrence is None
    for a, b in zip(results[True][1:], results[False][1:]):
        assert torch.allclose(a, b, atol=1e-6)
