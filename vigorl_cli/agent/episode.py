"""The grounded episode loop: single-turn, and multi-turn with the zoom tool. Used by eval, grpo and mcts alike.

An :class:`Episode` is a small state machine over one sample: ``request()`` gives the next generation request,
``feed(completion)`` consumes the model's turn and decides what happens next (answer → done; tool call → crop →
observation turn → next request; neither → done). Runners drive many episodes at once:

* :func:`run_episodes` with a batched engine (HF, or vLLM with ``no_barrier=False``): every pending turn of every
  live episode goes into one ``engine.generate`` call; episodes that finish drop out, the rest continue
  (turn-synchronous batching, the reference design: every episode's next turn waits for the slowest turn);
* with a streaming engine (vLLM, ``no_barrier=True``, the default) each turn is submitted on its own into vLLM's
  continuously batched engine, and an episode's next turn is submitted as soon as its previous turn returns while
  the other episodes' turns keep decoding; same requests and seeds, so the same episodes as turn-synchronous;
* with an async engine (OpenAI-compatible pool) each episode runs as its own task: it starts its next turn as soon
  as its previous turn returns, with no batch-wide barrier.

**Token-exact.** The transcript is a list of :class:`Segment` s of token ids with provenance: ``prompt``,
``sampled`` (exactly the ids the engine returned, with their log-probs), ``observation`` (the tool result turn,
tokenized once), ``forced`` (an appended ``<|im_end|>`` or the forced-answer prefix). Ids are never decoded and
re-encoded. The loss mask is 1 exactly on ``sampled`` tokens. Image placeholders are unexpanded (one
``<|image_pad|>`` per image) as engines take them.

Multi-turn semantics follow the reference GRPO rollout (reference §5.5) by default:

* a turn stops at ``</tool_call>``, ``</answer>`` or ``<|im_end|>``; a turn that ended on a stop string gets an
  appended ``<|im_end|>``;
* ``</answer>`` ends the episode; a turn with neither a tool call nor an answer ends it;
* at most ``max_images`` images (the full image + crops) and ``max_turns`` assistant turns; with the crop that
  reaches ``max_images`` the forced-answer prefix (``<think> Based on all ... </think>\\n<answer>``) is appended;
* a turn that would overflow the response budget (sampled + observation + crop tokens) is not taken.

Where we differ from the reference, deliberately:

* the forced prefix and appended ``<|im_end|>`` tokens are **not** trained on (loss mask 0); the reference trains on
  the forced text as if the policy had produced it;
* an unusable tool call (bad JSON, point outside the image) ends the episode with its failure kind recorded; the
  reference silently re-prompts the model after its own ``<|im_end|>`` with no new user turn;
* crops are taken from the image the model saw (reference) or, with ``ZoomTool(source="original")``, from the
  original at the same window, which gives sharper crops of large images.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vigorl_cli.agent.parse import FailureKind, parse_response, parse_tool_call
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, derive_seed
from vigorl_cli.models import prompts
from vigorl_cli.vision.frames import Frame, PointError
from vigorl_cli.vision.zoom import ZoomTool

MULTITURN_STOP = ("</tool_call>", "</answer>", "<|im_end|>")
OBSERVATION_STYLES = ("rl", "sft", "eval")


@dataclass
class EpisodeConfig:
    """How an episode runs. Built from a recipe by the caller (eval/grpo/mcts)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)  # per turn; n is ignored (one draw per episode)
    multiturn: bool = False
    zoom: ZoomTool | None = None
    max_turns: int = 5
    max_images: int = 5
    max_response_tokens: int = 2048  # sampled + observation + forced tokens (image tokens counted expanded)
    force_answer: bool = True  # append the forced-answer prefix with the crop that reaches max_images
    forced_greedy: bool = False  # sample the forced answer greedily (reference eval does)
    # text of the observation turn (models/prompts.py:observation_text): "rl" (reference GRPO rollout §5.5, what the
    # released RL checkpoints were trained with) | "sft" (the multi-turn SFT data §2.2) | "eval" (reference eval §6.4)
    observation_style: str = "rl"
    mask_forced: bool = True  # loss mask 0 on forced tokens (the reference trains on them)


@dataclass
class Segment:
    kind: str  # "prompt" | "sampled" | "observation" | "forced"
    ids: list[int]
    text: str
    logprobs: list[float] | None = None
    n_images: int = 0  # image placeholders inside this segment
    retokenized: bool = False  # ids came from tokenizing returned text (chat engines without token ids)


@dataclass
class ShownImage:
    image: Image.Image  # what the model sees
    frame: Frame  # how it maps to the original image
    key: str  # stable cache key ("<sample id>/full", "<sample id>/crop-1", ...)


class Episode:
    """One grounded conversation about one sample."""

    def __init__(self, sample: Sample, image: Image.Image, frame: Frame, system_prompt: str | None,
                 processor: Any, config: EpisodeConfig, seed: int = 0, draw: int = 0, original: Image.Image | None = None):
        self.sample = sample
        self.cfg = config
        self.processor = processor
        self.tok = processor.tokenizer
        self.seed = seed
        self.draw = draw
        self.original = original if original is not None else image
        # cache keys must identify the pixels for the engine's lifetime (the OpenAI engine caches encodings by key)
        src = sample.images[0] if sample.images else ""
        self.key_base = f"{sample.id}@{src}@{frame.original_size[0]}x{frame.original_size[1]}"
        self.images: list[ShownImage] = [ShownImage(image, frame, f"{self.key_base}/full-{image.size[0]}x{image.size[1]}")]
        self.crops: list[dict] = []
        self.segments: list[Segment] = []
        self.turn_texts: list[str] = []
        self.failures: list[str] = []
        self.turns = 0
        self.done = False
        self.finish: str | None = None  # answered | no_action | max_turns | max_images | budget | tool_error | error
        self.answer: str | None = None
        self._pending_prefix = ""  # forced text that starts the next assistant turn
        self._force_next = False
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        ip = processor.image_processor
        self.px_per_token = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
        # the prompt: system + user [image, question]
        self.messages: list[dict] = []
        if system_prompt:
            self.messages.append({"role": "system", "content": system_prompt})
        self.messages.append({"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": sample.prompt_text()}]})
        text = processor.apply_chat_template(self._template_messages(), tokenize=False, add_generation_prompt=True)
        self.segments.append(Segment("prompt", self._encode(text), text, n_images=1))

    # -- construction helpers -----------------------------------------------------------------------------------------
    def _template_messages(self) -> list[dict]:
        out = []
        for m in self.messages:
            if isinstance(m["content"], str):
                out.append(m)
            else:
                out.append({"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else c
                                                           for c in m["content"]]})
        return out

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _image_tokens(self, img: Image.Image) -> int:
        w, h = img.size
        return max(1, (w // self.px_per_token) * (h // self.px_per_token))

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    def response_tokens(self) -> int:
        """Tokens after the prompt, with image placeholders counted as the tokens they expand to."""
        n = sum(len(s.ids) for s in self.segments[1:])
        extra = sum(self._image_tokens(si.image) - 1 for si in self.images[1:])
        return n + extra

    def _fail(self, kind: str) -> None:
        if kind not in self.failures:
            self.failures.append(kind)

    def _end(self, finish: str) -> None:
        self.done = True
        self.finish = finish

    # -- the protocol ---------------------------------------------------------------------------------------------
    def request(self) -> GenerationRequest:
        """The next turn's request. Only valid while ``not done``."""
        budget = self.cfg.max_response_tokens - self.response_tokens()
        p = self.cfg.sampling
        max_new = max(1, min(p.max_new_tokens, budget))
        stop = tuple(p.stop) or (MULTITURN_STOP if self.cfg.multiturn else ())
        params = p.with_(n=1, max_new_tokens=max_new, stop=stop,
                         seed=derive_seed(self.seed, self.sample.id, self.draw, self.turns))
        if self._force_next and self.cfg.forced_greedy:
            params = params.with_(temperature=0.0)
        msgs = list(self.messages)
        if self._pending_prefix:
            msgs.append({"role": "assistant", "content": self._pending_prefix, "prefix": True})
        return GenerationRequest(prompt_ids=self.prompt_ids, images=[si.image for si in self.images], params=params,
                                 request_id=f"{self.sample.id}/{self.draw}/{self.turns}", messages=msgs,
                                 image_keys=[si.key for si in self.images])

    def feed(self, c: Completion) -> None:
        """Consume one assistant turn."""
        self.turns += 1
        if c.finish_reason == "error":
            self._fail("engine_error")
            self._end("error")
            return
        ids = list(c.token_ids)
        retok = False
        if not ids and c.text:  # chat-only engine that did not report token ids
            ids, retok = self._encode(c.text), True
        self.segments.append(Segment("sampled", ids, c.text, c.logprobs if not retok else None, retokenized=retok))
        turn_text = self._pending_prefix + c.text
        self._pending_prefix = ""
        self.turn_texts.append(turn_text)
        self.messages.append({"role": "assistant", "content": turn_text.replace("<|im_end|>", "")})
        if c.finish_reason == "stop" and ids and ids[-1] != self.im_end:
            self.segments.append(Segment("forced", [self.im_end], "<|im_end|>"))  # close the turn (reference)

        if not self.cfg.multiturn:
            self._finish_answer(turn_text, c)
            return
        if "<answer>" in turn_text:
            self._finish_answer(turn_text, c)
            return
        if c.finish_reason == "length" and self.response_tokens() >= self.cfg.max_response_tokens:
            self._fail("truncated")
            self._end("budget")
            return
        if len(self.images) >= self.cfg.max_images:
            self._end("max_images")
            return
        if self.turns >= self.cfg.max_turns:
            self._end("max_turns")
            return
        tc = parse_tool_call(turn_text)
        if tc is None:
            self._fail(str(FailureKind.NO_ANSWER_TAG))
            self._end("no_action")
            return
        if tc.coordinate is None or tc.failure in (FailureKind.BAD_TOOL_JSON, FailureKind.BAD_COORDINATE,
                                                   FailureKind.TOOL_MISSING_COORDINATE):
            self._fail(str(tc.failure or FailureKind.BAD_TOOL_JSON))
            self._end("tool_error")
            return
        self._observe(tc.coordinate)

    def _observe(self, point: tuple) -> None:
        zoom = self.cfg.zoom or ZoomTool(offset=182, crop_size=672, draw_dot=False)
        full = self.images[0]
        try:
            src = self.original if zoom.source == "original" else full.image
            crop = zoom.crop(src, point, full.frame)
        except PointError as e:
            self._fail(getattr(e, "kind", "invalid_point"))
            self._end("tool_error")
            return
        style = self.cfg.observation_style
        if style not in OBSERVATION_STYLES:
            raise ValueError(f"observation_style {style!r}: expected one of {', '.join(OBSERVATION_STYLES)}")
        before, after = prompts.observation_text(zoom.draw_dot, compat_eval=style == "eval", compat_rl=style == "rl")
        vision = "<|vision_start|><|image_pad|><|vision_end|>"
        forced = len(self.images) + 1 >= self.cfg.max_images and self.cfg.force_answer
        text = f"\n<|im_start|>user\n{before}{vision}{after}<|im_end|>\n<|im_start|>assistant\n"
        ids = self._encode(text)
        prefix_ids = self._encode(prompts.FORCED_ANSWER_PREFIX) if forced else []
        need = len(ids) + len(prefix_ids) + self._image_tokens(crop.image) - 1
        if self.response_tokens() + need >= self.cfg.max_response_tokens:
            self._fail("truncated")
            self._end("budget")
            return
        win = ",".join(f"{v:g}" for v in crop.frame.window)
        self.images.append(ShownImage(crop.image, crop.frame,
                                      f"{self.key_base}/crop-{win}-{crop.image.size[0]}-{zoom.draw_dot}-{zoom.source}"))
        self.crops.append({"point": list(crop.point), "frame": full.frame.to_dict(), "window": list(crop.window),
                           "window_original": list(crop.frame.window)})
        self.segments.append(Segment("observation", ids, text, n_images=1))
        self.messages.append({"role": "user", "content": [{"type": "text", "text": before},
                                                          {"type": "image", "image": crop.image},
                                                          {"type": "text", "text": after}]})
        if forced:
            self.force_answer()

    def force_answer(self) -> None:
        """Make the next turn the final answer: the forced-answer prefix (``FORCED_ANSWER_PREFIX``) starts it, as
        with the crop that reaches ``max_images``. Used there and by MCTS (multi-turn) at its step and depth limits.
        No effect on a finished episode or one whose next turn is already forced."""
        if self.done or self._pending_prefix:
            return
        self.segments.append(Segment("forced", self._encode(prompts.FORCED_ANSWER_PREFIX),
                                     prompts.FORCED_ANSWER_PREFIX))
        self._pending_prefix = prompts.FORCED_ANSWER_PREFIX
        self._force_next = True

    def _finish_answer(self, turn_text: str, c: Completion) -> None:
        parsed = parse_response(turn_text)
        self.answer = parsed.answer
        for f in parsed.failures:
            if f in (FailureKind.NO_ANSWER_TAG, FailureKind.UNCLOSED_ANSWER, FailureKind.EMPTY_ANSWER):
                self._fail(str(f))
        if c.finish_reason == "length":
            self._fail("truncated")
        self._end("answered" if self.answer is not None else "no_answer")

    # -- outputs ----------------------------------------------------------------------------------------------------
    @property
    def ends_with_eos(self) -> bool:
        return bool(self.segments) and bool(self.segments[-1].ids) and self.segments[-1].ids[-1] == self.im_end

    def loss_mask(self) -> list[int]:
        out: list[int] = []
        for s in self.segments:
            on = s.kind == "sampled" or (s.kind == "forced" and not self.cfg.mask_forced)
            out.extend([1 if on else 0] * len(s.ids))
        return out

    def transcript(self) -> str:
        """Everything after the prompt, as text (assistant turns, observations, forced text)."""
        return "".join(s.text for s in self.segments[1:])

    def tool_calls(self) -> list[dict | None]:
        """One entry per assistant turn: ``None`` when the turn made no tool call, else the call as parsed
        (``json``: the JSON body when it is valid JSON, ``name``, ``coordinate``, ``failure``, ``tolerated``)."""
        out: list[dict | None] = []
        for text in self.turn_texts:
            tc = parse_tool_call(text)
            if tc is None:
                out.append(None)
                continue
            try:
                body = json.loads(tc.raw.strip())
            except ValueError:
                body = None
            out.append({"json": body, "name": tc.name,
                        "coordinate": list(tc.coordinate) if tc.coordinate is not None else None,
                        "failure": str(tc.failure) if tc.failure else None, "tolerated": list(tc.tolerated)})
        return out

    def n_tokens(self) -> int:
        return sum(len(s.ids) for s in self.segments if s.kind == "sampled")

    def to_record(self) -> dict:
        return {"turns": self.turns, "finish": self.finish, "answer": self.answer, "failures": list(self.failures),
                "crops": self.crops, "turn_texts": self.turn_texts, "transcript": self.transcript(),
                "tool_calls": self.tool_calls(), "tokens": self.n_tokens(),
                "ends_with_eos": self.ends_with_eos,
                "segments": [{"kind": s.kind, "n": len(s.ids), "images": s.n_images} for s in self.segments]}


# -- runners ------------------------------------------------------------------------------------------------------

def run_episodes(engine: Any, episodes: list[Episode], on_done: Callable[[Episode], None] | None = None,
                 max_batch: int | None = None) -> None:
    """Drive episodes to completion. Async engines get one task per episode, streaming engines (vLLM with
    ``no_barrier``) one submitted request per turn, each next turn submitted as soon as the previous one returns: no
    barrier between episodes either way. Other batched engines get every pending turn in one call. ``max_batch``
    caps the turns per call (batched) or the episodes in flight (streaming)."""
    if hasattr(engine, "agenerate"):
        asyncio.run(_run_async(engine, episodes, on_done))
        return
    if getattr(engine, "no_barrier", False) and hasattr(engine, "submit"):
        _run_streaming(engine, episodes, on_done, max_batch)
        return
    live = [e for e in episodes if not e.done]
    while live:
        batch = live if max_batch is None else live[:max_batch]
        results = engine.generate([e.request() for e in batch])
        for e, comps in zip(batch, results):
            e.feed(comps[0] if comps else Completion([], "", None, "error", error="no completion"))
            if e.done and on_done is not None:
                on_done(e)
        live = [e for e in live if not e.done]


def _run_streaming(engine: Any, episodes: list[Episode], on_done: Callable[[Episode], None] | None,
                   max_in_flight: int | None) -> None:
    """No-barrier loop on a :class:`~vigorl_cli.engines.base.StreamingEngine`: an episode whose turn returns is fed
    and, unless done, its next turn (observation and crop appended) is submitted at once. Requests are those of the
    turn-synchronous loop (same ids, images, seeds), so the episodes come out identical, in a different order."""
    queue = [e for e in episodes if not e.done][::-1]  # popped from the end: episodes start in the given order
    live: dict[int, Episode] = {}

    def start(e: Episode) -> None:
        live[id(e)] = e
        engine.submit(e.request(), id(e))

    try:
        while queue and (max_in_flight is None or len(live) < max_in_flight):
            start(queue.pop())
        while live:
            for tag, comps in engine.poll():
                e = live.pop(tag)
                e.feed(comps[0] if comps else Completion([], "", None, "error", error="no completion"))
                if not e.done:
                    start(e)
                    continue
                if on_done is not None:
                    on_done(e)
                if queue:
                    start(queue.pop())
    except BaseException:  # Ctrl-C, a failing callback: leave no request running in the engine
        if live and hasattr(engine, "abort"):
            engine.abort()
        raise


async def _run_async(engine: Any, episodes: list[Episode], on_done: Callable[[Episode], None] | None) -> None:
    async def one(e: Episode) -> None:
        while not e.done:
            comps = await engine.agenerate(e.request())
            e.feed(comps[0] if comps else Completion([], "", None, "error", error="no completion"))
        if on_done is not None:
            on_done(e)

    await asyncio.gather(*(one(e) for e in episodes if not e.done))
