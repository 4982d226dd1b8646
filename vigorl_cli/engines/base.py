"""The engine protocol: everything that samples from a model goes through it.

Token ids are the currency. A :class:`GenerationRequest` carries the prompt as token ids with **one**
``<|image_pad|>`` per image (unexpanded, the form vLLM takes and the form the episode loop builds incrementally),
plus the images in placeholder order. Each engine expands placeholders its own way (HF: by the image grid;
vLLM: internally). A :class:`Completion` returns exactly the sampled token ids, their text, the raw policy
log-probs (temperature 1, before any sampling processor), and why it stopped. Nothing is ever decoded and
re-encoded on the way: the episode loop appends these ids verbatim.

``messages`` are carried as well for engines that only speak the chat API (OpenAI-compatible servers); such
engines return text, and their token ids come from the server when it reports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """What to sample. ``temperature == 0`` is greedy. ``top_k == 0`` disables top-k (HF's default 50 is not used)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = True

    def group_key(self) -> tuple:
        """Requests with equal keys can share one batched call: everything but the seed, ``n`` and
        ``max_new_tokens`` (a batch decodes to its longest limit; each row is cut at its own)."""
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.stop, self.logprobs)

    @classmethod
    def from_config(cls, cfg: Any, **over) -> "SamplingParams":
        """From a recipe ``SamplingConfig`` (temperature, top_p, top_k, max_new_tokens, repetition_penalty, n)."""
        kw = dict(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                  max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty)
        kw.update(over)
        if "stop" in kw:
            kw["stop"] = tuple(kw["stop"])
        return cls(**kw)

    def with_(self, **kw) -> "SamplingParams":
        return replace(self, **kw)


@dataclass
class GenerationRequest:
    """One prompt. ``prompt_ids`` hold one image placeholder per entry of ``images`` (in order)."""

    prompt_ids: list[int]
    images: list[Any] = field(default_factory=list)  # PIL images
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    messages: list[dict] | None = None  # chat form, for chat-only engines
    image_keys: list[str] | None = None  # stable cache keys of the images (e.g. "sample-id/full", "sample-id/crop-2")


@dataclass
class Completion:
    """One sample. ``token_ids`` are exactly what the model sampled (including a final eos or stop token)."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: FinishReason
    stop_reason: str | None = None  # the stop string or "eos" that ended it
    error: str | None = None  # engine-level failure for this request (finish_reason == "error")

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Engine(Protocol):
    """Batched, synchronous sampling: one list of completions (``params.n`` of them) per request."""

    name: str

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncEngine(Protocol):
    """Per-request asynchronous sampling (OpenAI-compatible pool): episodes never wait for each other."""

    name: str

    async def agenerate(self, request: GenerationRequest) -> list[Completion]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamingEngine(Protocol):
    """Per-request submission into one continuously batched engine (vLLM): :func:`run_episodes` submits an episode's
    next turn as soon as its previous turn returns, while other episodes' turns are still decoding (no barrier).

    ``submit`` queues one request (its ``params.n`` samples) under a caller's ``tag``; ``poll`` advances the engine
    by one step and returns ``(tag, completions)`` for every request that finished (all ``n`` samples), possibly
    none; ``in_flight`` counts submitted requests not yet returned. A request's samples are the same whichever way
    it is run (``generate`` or ``submit``) and whatever runs beside it: seeds are per request.
    ``no_barrier`` False makes :func:`run_episodes` use ``generate`` (turn-synchronous) instead. An optional
    ``abort()`` drops every submitted request (called when the loop is interrupted).
    """

    name: str
    no_barrier: bool

    def submit(self, request: GenerationRequest, tag: Any) -> None: ...

    def poll(self) -> list[tuple[Any, list[Completion]]]: ...

    def in_flight(self) -> int: ...


def sample_seeds(base: int, n: int) -> list[int]:
    """The seeds of a request's ``n`` samples: ``base`` itself when ``n == 1``, else ``derive_seed(base, k)``
    (every engine seeds samples this way, so a request samples alike on each)."""
    return [derive_seed(base, k) for k in range(n)] if n > 1 else [base]


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from (run seed, sample id, turn, ...): the same on every machine and process.

    Python's ``hash(str)`` changes per process, so it cannot be used for string ids.
    """
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
