"""Single-turn chains → multi-turn zoom-tool dialogs (reference ``build_reasoning_chains_from_mcts_multiturn.py``,
digest §2.2), and multi-turn trees (``mcts.mode: multiturn``) → dialogs directly.

**From a single-turn chain** (:func:`chain_to_dialog`):

1. The image is resized into ``[min_pixels, max_pixels]`` (2.7–2.85 MP, Qwen smart resize: every image, up or
   down) and every ``(x, y)`` in the chain is mapped from the frame the teacher wrote it in (the tree's ``frame``;
   the original image for reference trees) to the resized image.
2. The final answer: a point ``(x, y)`` or text.
3. The coordinates of the reasoning are walked in order; the text up to the end of the sentence holding each one is
   accumulated; each NEW integer coordinate (at most ``max_turns``) closes an assistant turn
   ``"<think> {text} </think>\\n<tool_call>\\n{...search_coordinate...}\\n</tool_call>"`` followed by an observation
   user turn with the crop (:class:`~vigorl_cli.vision.zoom.ZoomTool`, from the resized image). A repeated
   coordinate keeps its text for the next call; text after the last coordinate is dropped (reference).
4. The closing turn: ``FINAL_THINK_TEXT + "<answer> … </answer>"``.
5. With probability ``shuffle_prob`` (dialogs with ≥ 2 tool calls) the first tool call and its observation move to
   a random later place, before another tool call or the final answer, and its crop moves with it.

Reference bugs fixed here (``docs/mcts.md``):

* the answer coordinate (``<answer> (x, y) </answer>``, web grounding) is no longer walked as a reasoning coordinate,
  so it no longer becomes an extra tool call whose think block holds the answer text;
* a sentence end is looked for only inside the reasoning (the reference could pull ``</think>`` and the answer into
  the last think block when the last sentence had no full stop);
* a coordinate inside text already consumed (two coordinates in one sentence) no longer repeats its own
  ``(x, y)`` string in the next think block;
* image files are named by the record id (unique), not ``batch_idx * len(batch) + i`` (which collides for the last,
  shorter batch); the resized full image is saved once per tree, not once per dialog;
* a point outside the image drops the dialog with a counted failure kind, not a bare ``except``.

Coordinates are mapped with :meth:`Frame.map_to` (pixel centres) where the reference computes ``int(v * s)``; they
differ by at most one pixel of the resized image.

**From a multi-turn tree** (:func:`tree_dialogs`): every correct rollout already is a dialog (its
``ephemeral_texts`` are the assistant turns, its ``crops`` say which turns called the tool); the crops are cut again
from the image the teacher saw with the tool settings stored in the tree. No coordinate is rewritten. The rollouts
go through the single-turn selection first (:func:`tree_dialog_chains`: dedupe, ``select="value"``, the per-tree
cap). No corrected dialogs: the wrong and the correct rollout of a node ran separate conversations, and splicing
them would give a dialog with more crops and turns than the episode allows (``tool.max_images``) whose later turns
never saw the earlier crops.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vigorl_cli.agent.parse import extract_answer, find_points
from vigorl_cli.data.schema import parse_point
from vigorl_cli.linearize.single import Chain, select_chains
from vigorl_cli.models import prompts
from vigorl_cli.search.tree import TreeRecord
from vigorl_cli.vision.frames import Frame, PointError, resize_image
from vigorl_cli.vision.zoom import ZoomTool

SENT_END_RE = re.compile(r"[.!?](?:\s|$|\n)")  # reference sentence end


@dataclass
class MultiturnSettings:
    zoom: ZoomTool = field(default_factory=lambda: ZoomTool(offset=182, crop_size=672, draw_dot=False))
    max_turns: int = 5
    min_pixels: int = 2_700_000
    max_pixels: int = 2_850_000
    shuffle_prob: float = 0.2


@dataclass
class Dialog:
    """One multi-turn SFT conversation. ``images[0]`` is the full image; ``images[k]`` the k-th observation crop.
    Message contents use ``<image>`` where an image goes (sharegpt)."""

    messages: list[dict]
    images: list[Image.Image]
    n_calls: int
    shuffled: bool = False


def rescale_coordinates(text: str, src: Frame, dst: Frame) -> str:
    """Every ``(x, y)`` in ``text`` mapped from ``src``'s pixels to ``dst``'s (unchanged when the sizes agree)."""
    if src.size == dst.size:
        return text
    out, pos = [], 0
    for p in find_points(text):
        x, y = src.map_to(p.xy, dst, check=False)
        out += [text[pos:p.span[0]], f"({x}, {y})"]
        pos = p.span[1]
    return "".join(out) + text[pos:]


def final_answer(text: str) -> tuple[int, int] | str | None:
    """The chain's answer: an integer point when it is one ``(x, y)``, else its text; ``None`` without one."""
    ans = extract_answer(text, strip_letter=False)
    if ans is None:
        return None
    pt = parse_point(ans)
    return (int(pt[0]), int(pt[1])) if pt is not None else ans


def shuffle_first_call(messages: list[dict], images: list[Any], rng: random.Random, prob: float) -> bool:
    """Reference augmentation: with ≥ 2 tool calls and probability ``prob``, move the first (call, observation)
    pair to just before a later tool call or the final answer, and its crop with it. In place; True if moved."""
    if not (len(messages) > 5 and rng.random() < prob):
        return False
    pair = messages[2:4]
    del messages[2:4]
    idx = rng.choice(range(4, len(messages), 2))
    messages[idx:idx] = pair
    images.insert(1 + (idx - 2) // 2, images.pop(1))
    return True


def chain_to_dialog(chain: str, question: str, image: Image.Image, frame: Frame, system_prompt: str,
                    st: MultiturnSettings, rng: random.Random) -> Dialog | str:
    """Convert one single-turn chain. ``image``: the resized image (``frame.size``); ``chain``: its coordinates
    already in ``frame``. Returns the dialog, or the failure kind that dropped it."""
    answer = final_answer(chain)
    if answer is None:
        return "no_answer"
    a_start = chain.find("<answer>")
    limit = chain.rfind("</think>", 0, a_start)
    limit = a_start if limit < 0 else limit
    turns: list[dict] = []
    images: list[Image.Image] = [image]
    cursor, acc, seen = 0, "", set()
    for p in find_points(chain[:limit]):
        e = p.span[1]
        m = SENT_END_RE.search(chain, e, limit)
        end = m.end() if m else limit
        # reference: text[cursor:s] + text[s:e] + text[e:end]; a point inside text already taken (a second point
        # of the same sentence) adds nothing here, where the reference repeated its "(x, y)"
        chunk = chain[cursor:end].strip() if end > cursor else ""
        cursor = max(cursor, end)
        if chunk:
            acc = acc + "\n\n" + chunk if acc else chunk
        key = (int(p.x), int(p.y))
        if key in seen or len(seen) >= st.max_turns:
            continue  # the text stays in acc for the next call
        seen.add(key)
        try:
            crop = st.zoom.crop(image, key, frame)
        except PointError as err:
            return err.kind
        reasoning = acc.replace("<think>", "").replace("</think>", "").strip()
        turns.append({"role": "assistant", "content": prompts.think_text(reasoning) + prompts.tool_call_text(*key)})
        turns.append({"role": "user", "content": prompts.observation_content(st.zoom.draw_dot)})
        images.append(crop.image)
        acc = ""
    turns.append({"role": "assistant", "content": prompts.FINAL_THINK_TEXT + prompts.answer_text(answer)})
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}] + turns
    shuffled = shuffle_first_call(messages, images, rng, st.shuffle_prob)
    return Dialog(messages, images, len(seen), shuffled)


def linearizer_frame(original: Image.Image, st: MultiturnSettings) -> tuple[Frame, Image.Image]:
    """The 2.7–2.85 MP frame of the multi-turn data and the image resized into it."""
    frame = Frame.smart_resize(*original.size, min_pixels=st.min_pixels, max_pixels=st.max_pixels)
    return frame, resize_image(original, frame)


def tree_frame(rec: TreeRecord, original_size: tuple[int, int]) -> Frame:
    """The frame the tree's coordinates are in: ours store it; reference trees used the original image."""
    f = rec.extra.get("frame")
    return Frame.from_dict(f) if f else Frame.identity(*original_size)


def tree_dialog_chains(rec: TreeRecord) -> list[Chain]:
    """The candidate dialogs of a multi-turn tree, as :class:`~vigorl_cli.linearize.single.Chain` s so that the
    single-turn selection (dedupe, ``select="value"``, the per-tree cap) applies unchanged: one ``direct`` chain
    per correct rollout, in pre-order. ``text`` is the rollout's turns as JSON (the dedupe key: identical turns are
    one dialog), ``score`` the (mean, min) of the node values on the path to the node that stored the rollout,
    ``coords`` the coordinates its turns named in order (think text and tool calls, each point once), ``payload``
    ``(turns, {turn: crop point})``. There are no corrected chains (``docs/mcts.md`` says why)."""
    out = []
    for node in rec.tree.iter_nodes():
        path_values = [n.value for n in node.path()[1:]] or [node.value]
        score = (sum(path_values) / len(path_values), min(path_values))
        for ro in node.rollouts:
            turns = tuple(ro.ephemeral_texts[1:])
            if ro.reward < 1.0 or not turns:
                continue
            crops = {int(c["turn"]): tuple(c["point"]) for c in ro.extra.get("crops") or []}
            coords: list = []
            for k, text in enumerate(turns, start=1):
                coords += [p.xy for p in find_points(text)]
                if k in crops:
                    coords.append(crops[k])
            out.append(Chain(json.dumps(turns), "direct", node.path_id, "\n".join(turns), str(ro.final_answer),
                             score, tuple(dict.fromkeys(coords)), payload=(turns, crops)))
    return out


def tree_dialogs(rec: TreeRecord, original: Image.Image, system_prompt: str, chains: list[Chain] | None = None
                 ) -> tuple[list[tuple[Chain, Dialog]], dict[str, int]]:
    """Dialogs of a multi-turn tree: one per chain of ``chains`` (default: every candidate of
    :func:`tree_dialog_chains`, deduplicated), its turns as they were searched, each crop cut again from the image
    the teacher saw with the tree's tool settings. Returns ``(chain, dialog)`` pairs and failures by kind."""
    if chains is None:
        chains = select_chains(tree_dialog_chains(rec))
    frame = tree_frame(rec, original.size)
    shown = resize_image(original, frame)
    tool = rec.extra.get("tool") or {}
    zoom = ZoomTool(offset=int(tool.get("offset", 182)), crop_size=int(tool.get("crop_size", 672)),
                    draw_dot=bool(tool.get("draw_dot", False)))
    out, failures = [], {}
    for ch in chains:
        turns, crops = ch.payload
        messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": rec.question}]
        images = [shown]
        try:
            for k, text in enumerate(turns, start=1):
                messages.append({"role": "assistant", "content": text})
                if k in crops:
                    images.append(zoom.crop(shown, crops[k], frame).image)
                    messages.append({"role": "user", "content": prompts.observation_content(zoom.draw_dot)})
        except PointError as err:
            failures[err.kind] = failures.get(err.kind, 0) + 1
            continue
        out.append((ch, Dialog(messages, images, len(crops))))
    return out, failures
