"""Conversations → token ids, targets and images; micro-batches, padded or padding-free; per-token log-probs.

What a training forward needs, built once here for SFT and GRPO alike:

* :func:`encode_conversation` renders a sharegpt conversation with the processor's own chat template and marks the
  tokens the loss sees: every assistant turn (its text and its end-of-turn token ``<|im_end|>``); system, user and
  observation turns, the ``<|im_start|>assistant\\n`` header, the newline after ``<|im_end|>`` and every image token are
  masked. Each ``<image>`` in a message takes the next image, and its ``<|image_pad|>`` is expanded to as many tokens
  as the image's patch grid gives (read from the file header; pixels are decoded only at collate time). A sample
  longer than ``max_seq_len`` is dropped, never cut: cutting through an image span is what crashes other trainers
  with "Image features and image tokens do not match". Chunks are tokenized separately (the prompt before a reply,
  then the reply), which is how the policy sees them at generation time.
* :class:`Collator` turns examples into a :class:`Batch`: right-padded rows, or one padding-free row of
  concatenated segments ("packing"). M-RoPE positions come from the model's own ``get_rope_index`` run on each
  segment alone, so a packed segment gets exactly the positions it would have by itself; for packing, a fourth row of
  plain per-segment text positions goes first, from which transformers builds the block-diagonal causal mask (sdpa)
  or the varlen boundaries (flash-attention). Targets are shifted per example, so no segment predicts its neighbour.
* :class:`LogProbModel` wraps the HF model: ``forward(**batch.model_inputs())`` returns the log-prob of every target
  token, computing logits only at scored positions, ``chunk_size`` rows at a time, each chunk recomputed in backward
  (full fp32 logits of a 2k×152k-vocab sequence would be 1.2 GB).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

IGNORE = -100  # target value of positions the loss does not see
IMAGE_TAG = "<image>"  # sharegpt placeholder: each one takes the next image of the record


class SampleError(Exception):
    """One sample that cannot be trained on; ``kind`` is counted and reported, the sample skipped."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Example:
    """One tokenized conversation (or GRPO trajectory), ready to collate. Pixels are loaded at collate time."""

    id: str
    input_ids: list[int]  # [L] image placeholders already expanded
    labels: list[int]  # [L] the token itself where the loss sees it, IGNORE elsewhere (HF convention, unshifted)
    images: list[Any] = field(default_factory=list)  # paths or PIL images, in order of appearance

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)  # the first token has no context to predict it from

    @classmethod
    def from_ids(cls, id: str, input_ids: Sequence[int], loss_mask: Sequence[bool], images: Sequence[Any] = (),
                 image_token_id: int | None = None) -> Example:
        """An example from token ids and a loss mask (GRPO: prompt + response ids, mask on response tokens)."""
        labels = [int(t) if m and t != image_token_id else IGNORE for t, m in zip(input_ids, loss_mask, strict=True)]
        return cls(id=id, input_ids=[int(t) for t in input_ids], labels=labels, images=list(images))


@dataclass
class Prepared:
    """The examples a data set yields, and what was dropped (counted by kind, with the first few messages)."""

    examples: list[Example]
    dropped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def drop(self, kind: str, message: str, keep: int = 20) -> None:
        self.dropped[kind] += 1
        if len(self.messages) < keep:
            self.messages.append(message)


# -------------------------------------------------------------------------------------------------------------------
# Tokenizing conversations
# -------------------------------------------------------------------------------------------------------------------

def _template_messages(messages: list[dict]) -> list[dict]:
    """sharegpt messages → chat-template messages: ``<image>`` becomes an image part; observations are user turns."""
    out = []
    for m in messages:
        role = "user" if m["role"] == "observation" else m["role"]
        text = str(m.get("content", ""))
        if IMAGE_TAG not in text:
            out.append({"role": role, "content": text})
            continue
        parts: list[dict] = []
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": role, "content": parts})
    return out


def render_chunks(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation as the chat template renders it, cut into ``(text, is_assistant_reply)`` chunks.

    A reply chunk runs from just after the generation prompt (``<|im_start|>assistant\\n``) to the end of its
    end-of-turn token; whitespace the template adds after it is not part of the reply. Needs a template whose
    rendering of a prefix of the conversation is a prefix of the whole (true of the Qwen-VL templates).
    """
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    msgs = _template_messages(messages)
    full = render(msgs, False)
    chunks: list[tuple[str, bool]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0 or not any(x["role"] == "user" for x in msgs[:i]):
            raise SampleError("no_prompt", f"assistant turn {i} has no user turn before it")
        before = render(msgs[:i], True)
        through = render(msgs[:i + 1], False).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before) >= cursor):
            raise SampleError("template", "the chat template does not render conversation prefixes as prefixes; "
                                          "cannot locate the assistant turns")
        chunks.append((full[cursor:len(before)], False))
        chunks.append((full[len(before):len(through)], True))
        cursor = len(through)
    if not chunks:
        raise SampleError("no_assistant", "no assistant turn to train on")
    chunks.append((full[cursor:], False))
    return [(t, a) for t, a in chunks if t]


def image_token_count(processor, size: tuple[int, int]) -> int:
    """Merged image tokens the processor makes of an image of ``size`` = (width, height)."""
    ip = processor.image_processor
    w, h = size
    patches = ip.get_number_of_image_patches(h, w, {})
    return patches // (int(getattr(ip, "merge_size", 2)) ** 2)


def _image_size(img: Any) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(img, (str, Path)):
        return img.size  # a PIL image (GRPO crops live in memory)
    try:
        with Image.open(img) as im:  # reads the header only
            return im.size
    except FileNotFoundError:
        raise SampleError("missing_image", f"image not found: {img}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SampleError("bad_image", f"cannot read image {img}: {e}") from None


def encode_conversation(processor, messages: list[dict], images: Sequence[Any], max_seq_len: int,
                        id: str = "0") -> Example:
    """Tokenize one conversation: ids with image placeholders expanded, labels on every assistant reply.

    Raises :class:`SampleError` (``image_count``, ``missing_image``, ``bad_image``, ``no_assistant``, ``too_long``,
    ...) for a sample that cannot be used; callers count and skip it.
    """
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<|image_pad|>")
    image_token_id = tok.convert_tokens_to_ids(image_token)
    n_tags = sum(str(m.get("content", "")).count(IMAGE_TAG) for m in messages)
    if n_tags != len(images):
        raise SampleError("image_count", f"{n_tags} <image> placeholders but {len(images)} images")
    chunks = render_chunks(processor, messages)
    if sum(text.count(image_token) for text, _ in chunks) != len(images):
        raise SampleError("image_count", f"the rendered text holds {image_token} outside the image placeholders")
    counts = iter([image_token_count(processor, _image_size(img)) for img in images])
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_reply in chunks:
        pieces = text.split(image_token)
        text = pieces[0] + "".join(image_token * next(counts) + p for p in pieces[1:])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += [t if is_reply and t != image_token_id else IGNORE for t in ids]
        if len(input_ids) > max_seq_len:
            break
    if len(input_ids) > max_seq_len:
        raise SampleError("too_long", f"longer than max_seq_len={max_seq_len} tokens (dropped, not cut)")
    ex = Example(id=str(id), input_ids=input_ids, labels=labels, images=list(images))
    if ex.n_targets == 0:
        raise SampleError("no_assistant", "the assistant turns are empty")
    return ex


def resolve_image(path: str, roots: Sequence[Path]) -> Path:
    """An image path as written in a record: absolute, or relative to the first root that holds it."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for root in roots:
        if (Path(root) / p).exists():
            return Path(root) / p
    return Path(roots[0]) / p if roots else p


def prepare_sft(records: Iterable, processor, image_roots: Sequence[Path], max_seq_len: int,
                start: Prepared | None = None) -> Prepared:
    """Encode SFT records (``SFTRecord``), dropping and counting the ones that cannot be used."""
    out = start if start is not None else Prepared([])
    for i, rec in enumerate(records):
        rid = str(rec.id) if rec.id is not None else str(i)
        try:
            images = [resolve_image(p, image_roots) for p in rec.images]
            out.examples.append(encode_conversation(processor, rec.messages, images, max_seq_len, id=rid))
        except SampleError as e:
            out.drop(e.kind, f"sample {rid}: {e.kind}: {e}")
    return out


# -------------------------------------------------------------------------------------------------------------------
# Collation
# -------------------------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One micro-batch. Padded: ``B`` right-padded rows. Packed: one row of ``B`` concatenated segments."""

    input_ids: torch.Tensor  # [B, L] padded | [1, T] packed
    position_ids: torch.Tensor  # [3, B, L] padded | [4, 1, T] packed (row 0: per-segment text positions)
    attention_mask: torch.Tensor | None  # [B, L] padded | None packed (segments come from position_ids[0])
    mm_token_type_ids: torch.Tensor  # [B, L] 0 text, 1 image
    targets: torch.Tensor  # [B, L] id of the next token where it is scored, IGNORE elsewhere
    pixel_values: torch.Tensor | None  # [sum of patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    seq_lens: list[int]  # real length of each example, in order (a fake-image segment is not listed)
    packed: bool
    # images shown more than once (a GRPO group's responses share their prompt's image): pixel_values holds the
    # distinct images only, grid_unique their grids, image_occurrence maps each occurrence to its distinct image
    image_occurrence: list[int] | None = None
    grid_unique: torch.Tensor | None = None

    @property
    def n_examples(self) -> int:
        return len(self.seq_lens)

    @property
    def n_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`LogProbModel.forward`."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask,
               "mm_token_type_ids": self.mm_token_type_ids, "targets": self.targets,
               "pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}
        if self.image_occurrence is not None:
            out.update(image_occurrence=self.image_occurrence, grid_unique=self.grid_unique)
        return out

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> Batch:
        def mv(t):
            if t is None:
                return None
            if float_dtype is not None and t.is_floating_point():
                t = t.to(float_dtype)
            return t.to(device, non_blocking=True)

        return Batch(mv(self.input_ids), mv(self.position_ids), mv(self.attention_mask), mv(self.mm_token_type_ids),
                     mv(self.targets), mv(self.pixel_values), mv(self.image_grid_thw), list(self.seq_lens),
                     self.packed, self.image_occurrence, mv(self.grid_unique))

    def per_example(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Split a ``[B, L]`` (padded) or ``[1, T]`` (packed) per-token tensor into one ``[L_i]`` tensor per example."""
        if self.packed:
            return list(values[0, :self.n_tokens].split(self.seq_lens))
        return [values[i, :n] for i, n in enumerate(self.seq_lens)]


def _open_rgb(img: Any):
    from PIL import Image

    if isinstance(img, (str, Path)):
        with Image.open(img) as im:
            return im.convert("RGB")
    return img.convert("RGB")


class Collator:
    """Examples → :class:`Batch`. ``rope_index`` is the model's ``get_rope_index`` (see :func:`rope_index_of`)."""

    def __init__(self, processor, config, rope_index: Callable, packing: bool, fake_image_if_empty: bool = False,
                 dedupe_images: bool = True):
        """``dedupe_images``: an image that several examples show (the same path, or the same PIL object: a GRPO
        group's responses) is processed and encoded once per micro-batch (Qwen2-VL / Qwen2.5-VL)."""
        from vigorl_cli.models.load import SHARED_IMAGE_KINDS, model_kind

        self.processor = processor
        self.config = config
        self.rope_index = rope_index
        self.packing = packing
        self.fake_image_if_empty = fake_image_if_empty
        self.dedupe_images = dedupe_images and model_kind(config) in SHARED_IMAGE_KINDS
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.image_token_id = config.image_token_id
        self._fake: Example | None = None

    def fake_image_example(self) -> Example:
        """``<|vision_start|><|image_pad|>…<|vision_end|>`` over a small blank image, scored nowhere.

        Under FSDP2 / ZeRO-3 every rank must run the vision tower in every forward (its blocks all-gather their
        weights collectively); a rank whose micro-batch holds no image gets this segment (environment.md §4). Packed,
        it is a segment of its own; padded, a row of its own, so it never touches the real samples.
        """
        if self._fake is None:
            from PIL import Image

            tok = self.processor.tokenizer
            ip = self.processor.image_processor
            side = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2)) * 2
            img = Image.new("RGB", (side, side), (255, 255, 255))
            n = image_token_count(self.processor, img.size)
            ids = ([tok.convert_tokens_to_ids("<|vision_start|>")] + [self.image_token_id] * n
                   + [tok.convert_tokens_to_ids("<|vision_end|>")])
            self._fake = Example("fake-image", ids, [IGNORE] * len(ids), [img])
        return self._fake

    def _positions(self, ids: torch.Tensor, mm: torch.Tensor, grids: torch.Tensor | None) -> torch.Tensor:
        pos, _ = self.rope_index(input_ids=ids[None], mm_token_type_ids=mm[None], image_grid_thw=grids)
        return pos  # [3, 1, L]

    def __call__(self, examples: Sequence[Example]) -> Batch:
        from vigorl_cli.models.load import distinct_images, mm_token_type_ids

        real = list(examples)
        segs = list(real)
        if self.fake_image_if_empty and not any(ex.images for ex in real):
            segs.append(self.fake_image_example())
        images = [img for ex in segs for img in ex.images]
        pixel_values = grid = grid_unique = None
        occurrence: list[int] | None = None
        per_seg_grids: list[torch.Tensor | None] = []
        if images:
            first, occ = distinct_images([str(img) if isinstance(img, (str, Path)) else id(img) for img in images])
            proc = self.processor.image_processor(
                images=[_open_rgb(images[i]) for i in (first if self.dedupe_images else range(len(images)))],
                return_tensors="pt")
            pixel_values, grid = proc["pixel_values"], proc["image_grid_thw"]  # [P, D], [N, 3]
            if self.dedupe_images and len(first) < len(images):
                occurrence = occ
                grid_unique, grid = grid, grid[torch.tensor(occurrence)]  # grids per occurrence for the positions
            k = 0
            for ex in segs:
                per_seg_grids.append(grid[k:k + len(ex.images)] if ex.images else None)
                k += len(ex.images)
        else:
            per_seg_grids = [None] * len(segs)
        merge = int(getattr(self.processor.image_processor, "merge_size", 2))
        ids_list, mm_list, pos_list, tgt_list = [], [], [], []
        for ex, g in zip(segs, per_seg_grids, strict=True):
            ids = torch.tensor(ex.input_ids, dtype=torch.long)  # [L_i]
            mm = mm_token_type_ids(ids, self.config)  # [L_i]
            expected = int((g.prod(-1) // merge ** 2).sum()) if g is not None else 0
            if int((mm == 1).sum()) != expected:
                raise SampleError("image_tokens", f"sample {ex.id}: {int((mm == 1).sum())} image tokens but the "
                                                  f"images give {expected}")
            ids_list.append(ids)
            mm_list.append(mm)
            pos_list.append(self._positions(ids, mm, g))  # [3, 1, L_i]
            tgt_list.append(torch.tensor(ex.labels[1:] + [IGNORE], dtype=torch.long))  # shifted within the example
        seq_lens = [len(ex) for ex in real]
        if self.packing:
            text_pos = torch.cat([torch.arange(len(t)) for t in ids_list])[None, None]  # [1, 1, T]
            mrope = torch.cat(pos_list, dim=2)  # [3, 1, T]
            return Batch(input_ids=torch.cat(ids_list)[None], position_ids=torch.cat([text_pos, mrope], dim=0),
                         attention_mask=None, mm_token_type_ids=torch.cat(mm_list)[None],
                         targets=torch.cat(tgt_list)[None], pixel_values=pixel_values, image_grid_thw=grid,
                         seq_lens=seq_lens, packed=True, image_occurrence=occurrence, grid_unique=grid_unique)
        B, L = len(segs), max(len(t) for t in ids_list)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        mm = torch.zeros((B, L), dtype=torch.long)
        targets = torch.full((B, L), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((3, B, L), dtype=torch.long)
        for i, (ids, m, p, t) in enumerate(zip(ids_list, mm_list, pos_list, tgt_list, strict=True)):
            n = len(ids)
            input_ids[i, :n], attention_mask[i, :n], mm[i, :n], targets[i, :n] = ids, 1, m, t
            position_ids[:, i, :n] = p[:, 0]
        return Batch(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                     mm_token_type_ids=mm, targets=targets, pixel_values=pixel_values, image_grid_thw=grid,
                     seq_lens=seq_lens, packed=False, image_occurrence=occurrence, grid_unique=grid_unique)


def hf_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the ``*ForConditionalGeneration`` model, its backbone, its lm_head), looking through a peft wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hf, hf.model, hf.lm_head


def rope_index_of(model: nn.Module) -> Callable:
    """The model's own M-RoPE position function (``get_rope_index``; it reads only the config)."""
    return hf_parts(model)[1].get_rope_index


# -------------------------------------------------------------------------------------------------------------------
# Per-token log-probs
# -------------------------------------------------------------------------------------------------------------------

def _chunk_logprobs(h: torch.Tensor, lm_head: nn.Module, tgt: torch.Tensor, temperature: float,
                    with_entropy: bool) -> torch.Tensor:
    logits = lm_head(h).float()  # [n, V]
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, tgt[:, None]).squeeze(-1) - lse  # [n]
    if not with_entropy:
        return logp
    probs = torch.softmax(logits, dim=-1)  # [n, V]
    entropy = lse - (probs * logits).sum(-1)  # [n]
    return torch.stack([logp, entropy])  # [2, n]


class LogProbModel(nn.Module):
    """The HF model (``self.hf``, possibly a peft model) with a forward that returns target log-probs.

    This is the module that gets wrapped by FSDP2 / DeepSpeed (so the root's hooks run around the whole forward) and
    whose ``hf`` attribute is saved with ``save_pretrained``.
    """

    def __init__(self, hf_model: nn.Module, chunk_size: int = 1024, packed_attention: bool = True):
        """``packed_attention``: switch an sdpa language model to ``vigorl_sdpa`` (models/packed_attention.py), so
        packed rows attend per sample in one causal call instead of through a T×T block mask; unpacked forwards
        are unchanged."""
        super().__init__()
        self.hf = hf_model
        self.chunk_size = chunk_size
        if packed_attention:
            from vigorl_cli.models.packed_attention import install_packed_attention

            install_packed_attention(hf_model)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, mm_token_type_ids=None, targets=None,
                pixel_values=None, image_grid_thw=None, temperature: float = 1.0, with_entropy: bool = False,
                generate: dict | None = None, image_occurrence: list[int] | None = None, grid_unique=None):
        """Log-prob of ``targets`` at each position ``[B, L]`` (0 where IGNORE); with entropy: ``([B, L], [B, L])``.

        ``generate``: instead, ``self.hf.generate(**generate)`` (rollouts on a sharded policy: through this, the root
        module's forward, FSDP2 gathers the root's parameters around generation and its blocks' per forward)."""
        if generate is not None:
            return self.hf.generate(**generate)
        from vigorl_cli.models.packed_attention import PLAN_KWARG, packed_segments, uses_packed_attention

        _, backbone, lm_head = hf_parts(self.hf)
        packed = position_ids is not None and position_ids.shape[0] == 4 and attention_mask is None
        segments, extra = contextlib.nullcontext(), {}
        if packed and uses_packed_attention(self.hf):  # per-sample causal attention without a T×T mask
            segments = packed_segments(position_ids[0])
            extra = {PLAN_KWARG: segments.plan}
        if image_occurrence is not None:  # pixel_values holds distinct images: encode each once (Batch)
            from vigorl_cli.models.load import shared_image_features

            shared = shared_image_features(hf_parts(self.hf)[0], grid_unique, image_occurrence)
        else:
            shared = contextlib.nullcontext()
        with segments, shared:
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                              image_grid_thw=image_grid_thw, use_cache=False, **extra).last_hidden_state  # [B, L, H]
        scored = targets != IGNORE  # [B, L]
        h = hidden[scored]  # [N, H] only the positions the loss sees
        tgt = targets[scored]  # [N]
        outs = []
        for s in range(0, h.shape[0], self.chunk_size):
            args = (h[s:s + self.chunk_size], lm_head, tgt[s:s + self.chunk_size], temperature, with_entropy)
            if torch.is_grad_enabled() and h.requires_grad:
                # recompute this chunk's logits in backward instead of keeping [N, V] fp32 alive
                outs.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
            else:
                outs.append(_chunk_logprobs(*args))
        empty = hidden.new_zeros((2, 0) if with_entropy else (0,), dtype=torch.float32)
        vals = torch.cat(outs, dim=-1) if outs else empty
        logp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)  # [B, L]
        if not with_entropy:
            return logp.masked_scatter(scored, vals)
        ent = torch.zeros_like(logp)
        return logp.masked_scatter(scored, vals[0]), ent.masked_scatter(scored, vals[1])


def count_targets(batches: Iterable[Batch]) -> int:
    return sum(b.n_targets for b in batches)


__all__ = ["IGNORE", "Batch", "Collator", "Example", "LogProbModel", "Prepared", "SampleError", "encode_conversation",
           "hf_parts", "image_token_count", "prepare_sft", "render_chunks", "resolve_image", "rope_index_of"]
