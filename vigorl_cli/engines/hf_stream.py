"""Continuous batching on the HF engine: the no-barrier episode loop without vLLM.

:class:`HFStreamingEngine` is the HF engine plus the :class:`~vigorl_cli.engines.base.StreamingEngine` protocol
(``submit`` / ``poll`` / ``in_flight``): a fixed number of batch **slots** share one static KV cache in which every
slot has its own sequence and its own write position (:class:`SlotCache`). A submitted request waits for a free slot;
all requests that start together are prefilled in one forward (an episode's next turn into the slot whose cache
still holds its earlier turns, feeding only the new tokens; others into fresh slots); then all slots decode
together, one CUDA graph per step on a GPU (forward, seeded sampling, recording), as
:mod:`~vigorl_cli.engines.static_decode` does for a batch, except that positions, cache slots, sampling counters and
token limits are per slot, and attention reads the cache only up to a bucket past the longest busy slot (a graph per
width). Every :attr:`~HFStreamingEngine.CHECK_EVERY` steps the host collects finished slots (eos, stop string, token
limit) and refills them, so an episode's next turn starts while the other episodes' turns are still decoding.
A prefill stalls every decoding slot, so while slots decode, waiting requests are gathered until a quarter of the
slots can start, or :attr:`~HFStreamingEngine.PREFILL_WAIT` polls after the last prefill. With
:attr:`~HFStreamingEngine.overlap` (opt-in, GPU) a prefill does not stall them: it runs on a side stream beside the
decode chunks (which run on a high-priority stream), and its rows join the decoding slots at the first host check
after it finished; meanwhile their slots decode into a dump column (:class:`SlotCache`). With
:attr:`~HFStreamingEngine.prefill_graphs` (opt-in) the language model's part of a prefill runs at bucketed shapes,
one CUDA graph per bucket (:class:`_PrefillGraphs`). No host-to-device copy of a prefill waits for the device (pinned,
non-blocking), so its host work overlaps the decode chunk in flight.

Same samples as :meth:`HFEngine.generate`: the same positions (the model's ``get_rope_index``), the same sampling
function with the same per-request seeds and per-token counters (tested on CPU: equal tokens and raw log-probs).
Limits: one set of sampling settings at a time (requests with other temperature / top-p / top-k wait until the slots
drain); no repetition penalty (such requests go through ``generate``); a sequence must fit the cache
(``cache_len``: prompt + new tokens; longer requests come back as per-request errors).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, derive_seed, sample_seeds
from vigorl_cli.engines.hf import HFEngine, sample_next
from vigorl_cli.engines.static_decode import (
    GraphCache,
    _attn_implementation,
    capture_step,
    capture_stream,
    decode_attention,
    new_lane,
    prompt_positions,
    supports,
    weight_addresses,
    weight_version,
)
from vigorl_cli.models.compile import eager
from vigorl_cli.models.load import SHARED_IMAGE_KINDS, cat_to_device, distinct_images, override, to_device
from vigorl_cli.models.vision_attention import fused_attention
from vigorl_cli.models.vision_graphs import TowerGraphs


def common_prefix(a: list, b: list, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``: slice comparisons (C loops) in a binary
    search rather than a Python loop over tokens."""
    limit = max(0, min(limit, len(a), len(b)))
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class SlotCache:
    """A static KV cache whose batch rows are independent sequences (the transformers ``Cache.update`` interface).

    Decode (``dst is None``): every slot's new key/value goes to that slot's own position ``pos[slot]``; attention
    reads the whole cache (a mask says which positions each slot sees). Prefill (``rows`` and ``dst`` set): row ``b``
    of the batch is slot ``rows[b]``, and its column ``j`` is written at cache position ``dst[b, j]``, so a slot whose
    cache already holds an episode's earlier turns receives only the new tokens, after them; attention then reads
    positions ``[0, read)`` of those slots (cached prefixes included). Padding columns, and the decode steps of slots
    without a request (a parked prefix, a prefill in flight on another stream), are written to one extra position
    past ``cache_len`` (the dump column) that no busy slot's mask admits."""

    is_compileable = True

    def __init__(self, slots: int, cache_len: int, device: torch.device):
        self.slots, self.cache_len = slots, cache_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # decode: where each slot writes; a slot without a request writes to the dump column
        self.pos = torch.full((slots,), cache_len, dtype=torch.long, device=device)
        self.arange = torch.arange(slots, device=device)
        self.rows: torch.Tensor | None = None  # prefill: [n] the slots of the batch rows
        self.dst: torch.Tensor | None = None  # prefill: [n, W] where each column goes (cache_len = nowhere)
        self.read = 0  # prefill: attention reads positions [0, read)
        self.width = cache_len + 1  # decode: attention reads positions [0, width)

    @property
    def dump(self) -> int:
        return self.cache_len  # the padding column: written, never attended

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.keys) <= layer_idx:  # allocated at the first prefill (dtype and heads known then)
            _, H, _, D = key_states.shape
            shape = (self.slots, H, self.cache_len + 1, D)
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype, device=key_states.device))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype, device=value_states.device))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.dst is not None:
            rows = self.rows[:, None]
            k[rows, :, self.dst] = key_states.transpose(1, 2)  # [n, W, H, D] at (slot, position) pairs
            v[rows, :, self.dst] = value_states.transpose(1, 2)
            return k[self.rows, :, :self.read], v[self.rows, :, :self.read]
        k[self.arange, :, self.pos] = key_states[:, :, 0]
        v[self.arange, :, self.pos] = value_states[:, :, 0]
        return k[:, :, :self.width], v[:, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def copy(self, src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        """Slot ``dst[i]`` gets the keys and values of slot ``src[i]``'s positions ``[0, n)``, in every layer."""
        for kv in (self.keys, self.values):
            for t in kv:
                t[dst, :, :n] = t[src, :, :n]


@dataclass
class _Row:
    group: dict  # the request's group: its tag and completions so far
    index: int  # which of the request's n samples
    max_new: int
    params: SamplingParams  # its stop strings end it (HFEngine._cut / _finish)
    prompt: list[int]  # the expanded prompt, held in cache positions [0, len(prompt))
    image_keys: list  # identity of the prompt's images, in order
    version: int  # weight_version() at its prefill
    positions: Any = None  # [3, len(prompt)] the prompt's M-RoPE positions (host)
    checked: int = 0  # tokens already searched for a stop string
    steps: int = 0  # decode steps taken, as of the last host check


@dataclass
class _Snapshot:
    """The slots' results right after a decode chunk (HFStreamingEngine.launch_before_collect)."""

    tensors: dict  # done, step, out_tok, out_lp: host copies
    event: Any  # their copy's CUDA event (None on CPU: copied already)
    n: int  # the chunk's steps
    rows: tuple  # the slots' rows during the chunk (a row that joined since is not in the copy)


@dataclass
class _Prepared:
    """A queued request, ready to prefill: computed once (:meth:`HFStreamingEngine._prepare`)."""

    ids: list[int]  # the prompt, image placeholders expanded
    pixels: list  # per image its processed pixels, or None while not needed (see _prepare)
    grid: Any  # [images, 3] patch grids, or None
    keys: list  # identity of each image
    runs: list[tuple[int, int]]  # [start, end) of each image's placeholders in ids

    def images_in(self, n: int) -> int:
        """Images wholly inside the first ``n`` tokens."""
        return sum(1 for _, end in self.runs if end <= n)


@dataclass
class _Pending:
    """A launched prefill whose rows have not joined the decoding slots yet (:meth:`HFStreamingEngine._join`)."""

    todo: list  # a _Start per row
    logits: torch.Tensor  # [rows, vocab] the last position's logits (computed on the prefill stream)
    version: int  # weight_version() at the prefill
    event: Any  # a CUDA event recorded after the forward, or None (it ran synchronously)
    collects: int  # host checks before its launch


@dataclass
class _Parked:
    """A finished slot whose cache still holds ``tokens`` (from position 0): the next turn of the same episode
    (its prompt extends these tokens) is prefilled from where they end."""

    tokens: list[int]
    image_keys: list
    version: int  # the weights' in-place version (``weight_version``) its keys and values were computed with
    poll: int = 0  # the poll that freed it
    positions: Any = None  # [3, P] M-RoPE positions of tokens[:P] (its prompt); the sampled tokens after it are text

    def prefix(self, n: int) -> torch.Tensor:
        """``[3, n]`` M-RoPE positions of ``tokens[:n]``: the prompt's, then one more per sampled token."""
        P = self.positions.shape[1]
        if n <= P:
            return self.positions[:, :n]
        after = int(self.positions[:, -1].max()) + 1 + torch.arange(n - P)
        return torch.cat([self.positions, after[None].expand(3, -1)], dim=1)


@dataclass
class _Start:
    """One row of a prefill: a request's sample starting in ``slot``, whose first ``reused`` prompt tokens the slot's
    cache already holds (``held``: what it held)."""

    slot: int
    group: dict
    req: GenerationRequest
    index: int  # which of the request's samples
    seed: int
    prep: Any  # _Prepared, or the exception that preparing raised
    reused: int = 0
    held: _Parked | None = None
    max_new: int = 0
    positions: Any = None  # [3, len(prompt)] set by the prefill


def bucket_width(w: int) -> int:
    """The fed-width bucket of a prefill: the smallest of 64, 96, 128, 192, 256, 384, ... that is at least ``w``
    (at most half again as wide as needed)."""
    b = 64
    while True:
        if w <= b:
            return b
        if w <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


class _PrefillGraphs(GraphCache):
    """The language model's part of a prefill at bucketed shapes, one CUDA graph per bucket.

    Meant for prefills whose host time exceeds their kernels' (a profiled 3B run showed ~13 ms of the language model's
    kernels behind ~69 ms of host time; unprofiled at ~3,100 fed tokens per prefill the padding cost what the replays
    saved: docs/performance.md, issue 7). Its shape changes every prefill, so it is padded to a bucket: rows to
    a power of two (at most the slot count), the fed width to :func:`bucket_width`, the cache read to a multiple of
    ``read_bucket``. Padding rows and columns write their keys and values to the dump column (:class:`SlotCache`) and
    see one cache position, so what the real rows compute is unchanged. The first :attr:`AFTER` prefills of a bucket run
    eagerly at its shape (compiling, if the model is compiled); the next one captures it into a graph (all graphs share
    one memory pool: one prefill runs at a time, and its output is read before the next), replayed from then on.
    The hidden state comes back for the last position only (what a prefill's one logit needs). Forwards the buckets
    cannot serve (other inputs, e.g. Qwen3-VL's deepstack features) run as they are. A new graph's first replay is
    checked against the eager forward of the same inputs (:class:`GraphCache`); a mismatch turns graphs off."""

    AFTER = 1  # eager runs of a bucket before it is captured
    KEEP = 64  # graphs kept (the least recently used are dropped)
    WHAT = "prefill graphs"

    def __init__(self, lm: torch.nn.Module, slots: int, cache_len: int, read_bucket: int, row_step: int = 0):
        super().__init__(lm)  # graphs: bucket → (graph, static inputs, static output)
        self.lm, self.slots, self.cache_len, self.read_bucket = lm, slots, cache_len, read_bucket
        self.row_step = row_step  # rows past it go to its multiples (0: powers of two throughout)
        self.cache: SlotCache | None = None
        self.padded = 0  # prefills run eagerly at a bucket's shape
        self.tokens = [0, 0]  # [rows × width fed, bucket rows × bucket width run]: what the padding costs

    def bucket(self, n: int, width: int, read: int) -> tuple[int, int, int]:
        step = self.row_step
        rows = min(self.slots, -(-n // step) * step if step and n > step else 1 << (n - 1).bit_length())
        full = self.cache_len + 1
        span = min(full, -(-read // self.read_bucket) * self.read_bucket) if self.read_bucket else full
        return rows, bucket_width(width), span

    def __call__(self, original, cache: SlotCache, args: tuple, kw: dict):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        embeds, mask, pos = kw.get("inputs_embeds"), kw.get("attention_mask"), kw.get("position_ids")
        known = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values", "use_cache")
        if (args or embeds is None or cache.dst is None or kw.get("past_key_values") is not cache
                or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4
                or not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] != 3
                or any(v is not None for k, v in kw.items() if k not in known)):
            return original(*args, **kw)
        n, W, H = embeds.shape
        read = mask.shape[-1]
        key = (*self.bucket(n, W, read), embeds.dtype)
        self.tokens[0] += n * W
        self.tokens[1] += key[0] * key[1]
        if self.cache is not cache or self.stale():
            self.graphs.clear()  # another cache, or parameters moved: the graphs read stale addresses
            self.cache = cache
        got = self.graphs.get(key)
        if got is not None:
            self.graphs.move_to_end(key)
            graph, inputs, out = got
            self._fill(inputs, embeds, mask, pos, cache)
            graph.replay()
            self.replays += 1
        else:
            inputs = self._inputs(key, H, embeds.device)
            self._fill(inputs, embeds, mask, pos, cache)
            self.seen[key] = self.seen.get(key, 0) + 1
            graph = None
            if self.use_graphs and self.seen[key] > self.AFTER:
                graph, out = self._capture(original, cache, inputs)
            if graph is not None:
                graph.replay()
                # checked once against the eager forward (which writes the same keys and values again)
                ref = self._run(original, cache, inputs)
                if not self._admit(key, (graph, inputs, out), out, ref):
                    out = ref
                    self.padded += 1
            else:
                out = self._run(original, cache, inputs)
                self.padded += 1
        return BaseModelOutputWithPast(last_hidden_state=out[:n], past_key_values=cache)

    def _inputs(self, key: tuple, hidden: int, device: torch.device) -> dict[str, Any]:
        rows, width, span, dtype = key
        lng = {"dtype": torch.long, "device": device}
        return {"embeds": torch.zeros((rows, width, hidden), dtype=dtype, device=device),
                "mask": torch.zeros((rows, 1, width, span), dtype=torch.bool, device=device),
                "pos": torch.zeros((3, rows, width), **lng), "rows": torch.zeros(rows, **lng),
                "dst": torch.full((rows, width), self.cache_len, **lng), "read": span}

    @staticmethod
    def _fill(inputs: dict, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: SlotCache) -> None:
        """The prefill's inputs into the bucket's, right-aligned; padding sees cache position 0 and writes nowhere."""
        n, W, _ = embeds.shape
        read = mask.shape[-1]
        rows, width = inputs["pos"].shape[1:]
        off = width - W
        inputs["embeds"][:n, off:].copy_(embeds)
        m = inputs["mask"]
        m.zero_()
        m[..., 0] = True
        m[:n, :, off:, :read].copy_(mask)
        inputs["pos"].zero_()
        inputs["pos"][:, :n, off:].copy_(pos)
        inputs["rows"][:n].copy_(cache.rows)
        inputs["rows"][n:].copy_(cache.rows[:1].expand(rows - n))
        inputs["dst"].fill_(cache.dump)
        inputs["dst"][:n, off:].copy_(cache.dst)

    @staticmethod
    def _run(original, cache: SlotCache, inputs: dict) -> torch.Tensor:
        saved = cache.rows, cache.dst, cache.read
        cache.rows, cache.dst, cache.read = inputs["rows"], inputs["dst"], inputs["read"]
        try:
            out = original(inputs_embeds=inputs["embeds"], attention_mask=inputs["mask"], position_ids=inputs["pos"],
                           past_key_values=cache, use_cache=True)
        finally:
            cache.rows, cache.dst, cache.read = saved
        # the last position only (a prefill keeps one logit), copied: the whole hidden state is a graph's
        # intermediate, whose memory the other graphs of the shared pool reuse
        return out.last_hidden_state[:, -1:].clone()

    def _capture(self, original, cache: SlotCache, inputs: dict) -> tuple[Any, torch.Tensor | None]:
        """Record the bucket's forward (not run); on failure (said once) it keeps running eagerly."""
        return self._record(lambda: self._run(original, cache, inputs))


class HFStreamingEngine(HFEngine):
    """The HF engine with continuous batching over ``slots`` slots (``engine.batch_size``)."""

    CHECK_EVERY = 8  # decode steps between host checks (finished slots are refilled then)
    # with ``overlap``: the decode chunk launched just before a prefill is this long, so that the device has decode
    # work queued for the whole of the prefill's host time (a prefill is launch-bound: docs/performance.md, issue 7)
    PREFILL_COVER = 16
    MAX_CHUNK = 64  # the longest chunk (longer CHECK_EVERY / PREFILL_COVER are cut to it): sizes the spare columns
    WARMUP_STEPS = 2
    no_barrier = True
    # An H200 run with overlap and prefill graphs hung: a 3B model's no-barrier loop waited forever in the collect
    # after a prefill graph was replayed beside the decode graphs (docs/performance.md, ninth session), both then
    # captured on one stream, so sharing one cuBLAS workspace (static_decode.capture_stream: now one stream per owner).
    # Until a GPU run shows that the lanes fixed it, overlapped prefills run their buckets eagerly; True lets them
    # replay graphs (benchmarks: --nb-variants 'overlap=true,prefill_graphs=true,OVERLAP_PREFILL_GRAPHS=true')
    OVERLAP_PREFILL_GRAPHS = False
    # prefill_graphs' row buckets: powers of two up to this, then its multiples (0: powers of two throughout). At 512
    # episodes on an H200, powers of two ran 9-row prefills as 16 rows and the prefill graphs were slower than eager
    # prefills (docs/performance.md, ninth session); finer buckets pad less but repeat less often
    PREFILL_ROW_STEP = 0

    def __init__(self, bundle, batch_size: int = 16, seed: int = 0, cache_len: int = 4096,
                 max_new_cap: int = 4096, autocast_dtype: torch.dtype | None = None, use_graphs: bool | None = None):
        # generate() (e.g. repetition-penalty requests, MCTS batches) takes the static decode loop too
        super().__init__(bundle, batch_size=batch_size, seed=seed, autocast_dtype=autocast_dtype, static_cache=True)
        if not supports(self.model, bundle.kind) or _attn_implementation(self.model) == "eager":
            raise ValueError(f"continuous batching supports the Qwen-VL families with sdpa attention, not "
                             f"{bundle.kind!r} with {_attn_implementation(self.model)!r}")
        self.slots = self.batch_size
        self.cache_len = int(cache_len)
        self.max_new_cap = int(max_new_cap)
        self.use_graphs = use_graphs
        self._queue: deque = deque()  # [group, request, seeds, samples placed, prepared inputs or None, poll]
        self._rows: list[_Row | None] = [None] * self.slots
        self._parked: dict[int, _Parked] = {}  # free slots whose cache may serve an episode's next turn
        self.reused_tokens = 0  # prompt tokens not prefilled again thanks to a parked prefix (tests, benchmarks)
        self.prefills = 0  # prefill forwards so far
        self.prefill_tokens = [0, 0]  # prompt tokens prefilled so far: [fed, fed + left padding]
        self.decode_steps = 0  # decode steps of all slots together so far
        # launch the next decode chunk before poll returns (see poll); only worth it where the device runs
        # asynchronously to the host
        self.pipeline = self.model.device.type == "cuda"
        # prefill on a side stream while the slots decode (see _prefill / _join; on CPU the rows still join one chunk
        # late: tests). Off by default: on an H200 it has not beaten the stalling prefill yet (docs/performance.md,
        # issue 7: 42.0-51.0 s against 46.5-48.9 s in the same runs, 44.2 against 40.9 s later; with PREFILL_COVER
        # 16 / 24: 43.2 / 46.1 s against 45.6 s, and 41.4 s for PREFILL_WAIT=8 alone, seventh session)
        self.overlap = False
        self.prefill_min = max(1, self.slots // 4)  # rows worth a prefill while other slots decode
        # run the language model's part of a prefill at bucketed shapes (rows, fed width, cache read), as one CUDA
        # graph per bucket on a GPU once a bucket comes back (_PrefillGraphs), against a prefill's launch overhead
        # (docs/performance.md, issue 7). On CPU the same padded shapes run eagerly (tests). Off by default: on an H200
        # at ~3,100 fed tokens per prefill the padding cost what the replays saved (43.6 against 43.8 s, seventh session)
        self.prefill_graphs = False
        self._lm_graphs: _PrefillGraphs | None = None
        self._overlap_warned = False  # said once: prefill graphs run eagerly with overlap (_graphed_lm)
        # run prefills without model.compile's compiled norms and MLPs (models/compile.py; decode steps keep them):
        # on an H200 a compiled region's call cost 170-460 µs of host time (profiled) against ~100 µs for its eager
        # ops, ~200 calls per prefill, and a prefill's launches are what the GPU waits for (docs/performance.md,
        # issue 7). Off by default until measured
        self.prefill_eager = False
        # run the vision tower per group of same-grid images (a prefill's zoom crops share one grid), one CUDA graph
        # per (grid, count) on a GPU (models/vision_graphs.py): the tower's ~15 launches per block are host time the
        # GPU waits for in a prefill. On by default on a GPU: at 512 episodes on an H200, once the vision MLP ran on
        # aligned widths (models/aligned_mlp.py), 65.6 against 67.9 s and 69.6 against 73.4 s in two calls; while the
        # tower was compute-bound it gained nothing (68.6 against 68.5 s; docs/performance.md, issue 7). Off on CPU
        # (and without graphs), where the groups only add calls
        self.vision_graphs = self.model.device.type == "cuda" and use_graphs is not False
        self._tower_graphs: TowerGraphs | None = None
        # encode the new images of waiting requests before their prefill, at the start of a poll: on a GPU on a side
        # stream, beside the decode chunk in flight, into the feature cache their prefill reads (_encode_ahead). The
        # tower is a prefill's compute-bound half (~45 ms of ~105 ms per prefill at 512 episodes on an H200, with
        # vision_graphs: docs/performance.md, issue 7); the turn-synchronous loop has no decode to hide it behind.
        # Off: measured on an H200 at 512 episodes (tenth session), the tower beside the decode took 3× its device
        # time and slowed the decode 4-8% (67.0 against 68.0 s in one call, 76.8 against 71.0 s in another)
        self.vision_ahead = False
        # process a submitted request's new images (resize, normalise: ~3 ms each on an H200's host, on the host's
        # critical path in _prepare) in this many background threads from submit on, while the main thread launches
        # decode chunks and waits for them (0: in _prepare, on the main thread). Off: no gain measured beside
        # vision_ahead on an H200 (67.8 against 68.0 s, tenth session)
        self.prepare_threads = 0
        # with pipeline (and without overlap): launch the next decode chunk *before* collecting the one in flight,
        # whose results (finished flags, steps, tokens) were copied to host memory right after it (_snapshot), so
        # the device decodes while the host turns them into completions instead of waiting for the host after every
        # check. The schedule is the same step for step: slots freed by a collect are refilled at the next poll's
        # fill either way, and a finished slot decodes on (into its own cache past what it parks, or the dump
        # column) until then; no chunk is launched once every row has finished (by its flags; a row that only a
        # stop string ends costs one more chunk at a drain). Off: slower on an H200 at 512 episodes, same schedule
        # (83.5 against 73.4 s; 78.3 against 69.6 s with vision_graphs; eleventh session, docs/performance.md)
        self.launch_before_collect = False
        self._snap: _Snapshot | None = None  # the chunk in flight's results, copied right after it
        self._snap_bufs: list = []  # two sets of pinned host buffers (GPU), alternating
        self._executor: Any = None
        self._early: dict[str, Any] = {}  # image key → future of (pixels, grid row), until a _prepare takes it
        self.ahead_images = 0  # images encoded ahead so far (tests, benchmarks)
        self.prefill_images = 0  # images the prefills encoded themselves so far
        self._ahead_stream_: Any = None
        self._ahead_towers: TowerGraphs | None = None  # its own graphs: a prefill's tower may run beside it
        self._chunk_event: Any = None  # on the caller's stream just before the pipelined chunk (_encode_ahead)
        self.decode_priority = -1  # CUDA stream priority of the decode chunks (lower = higher) while overlapping
        self._streams: tuple = ()  # (priority, decode stream, prefill stream)
        self._caller = None  # the stream poll was called on (its work, e.g. a weight update, comes first)
        self._pending: _Pending | None = None
        self._collects = 0  # host checks so far
        self._chunk = False  # a launched chunk not collected yet
        self._polls = 0
        self._prefilled_at = 0  # the poll of the last prefill
        self._grids: OrderedDict[str, torch.Tensor] = OrderedDict()  # image key → patch grid (see _prepare)
        self._ready: list[tuple[Any, list[Completion]]] = []
        self._n_in_flight = 0
        self._streamed = 0
        self._params = None  # the sampling settings the slots run now
        self._params_core: tuple = ()
        self._st: dict[str, Any] | None = None
        self._graphs: dict[int, Any] = {}  # read width → captured decode step (replaced all together: their lane)
        self._lane = new_lane("decode")  # the capture stream of the decode steps (static_decode.capture_stream)
        self._graph_weights: tuple = ()  # parameter addresses the graphs were captured with
        self._eager_steps = 0
        self.captures = 0
        self.capture_error: str | None = None

    # -- StreamingEngine ------------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, tag: Any) -> None:
        """Queue one request (its ``params.n`` samples); :meth:`poll` returns it under ``tag``."""
        self._n_in_flight += 1
        p = request.params
        base = p.seed if p.seed is not None else derive_seed(self.seed, "stream", self._streamed)
        self._streamed += 1
        seeds = sample_seeds(base, p.n)
        group = {"tag": tag, "out": [None] * p.n, "left": p.n}
        if p.repetition_penalty != 1.0:  # not in the slot graph: one batched generate for it, same seeds
            self._ready.append((tag, self.generate([replace(request, params=p.with_(seed=base))])[0]))
            return
        self._queue.append([group, request, seeds, 0, None, self._polls])
        if self.prepare_threads > 0:
            self._process_early(request)

    def in_flight(self) -> int:
        return self._n_in_flight

    def reset_caches(self) -> None:
        """Forget every cached prefix (the parked slots' keys and values), image feature and image grid: the next
        requests start cold, as after a weight update (benchmarks: a run after another one would otherwise reuse
        the first turns it left parked)."""
        super().reset_caches()
        self._parked.clear()
        self._grids.clear()

    def abort(self) -> None:
        self._after_streams()  # what the caller does next (a weight update) waits for a chunk or prefill in flight
        self._queue.clear()
        self._early.clear()  # (images being processed for dropped requests: their results are not needed)
        self._rows = [None] * self.slots
        self._parked.clear()
        self._ready.clear()
        self._n_in_flight = 0
        self._chunk = False
        self._pending = None
        self._snap = None
        if self._st is not None:  # the abandoned slots write nowhere from now on (a later prefill may use them)
            self._st["cache"].pos.fill_(self._st["cache"].dump)

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        self._after_streams()  # e.g. features a prefill in flight is still writing to the feature cache
        return super().generate(requests)

    def poll(self) -> list[tuple[Any, list[Completion]]]:
        """Fill free slots, decode :attr:`CHECK_EVERY` steps, return the requests whose samples all finished.

        With :attr:`pipeline` (on a GPU), the next :attr:`CHECK_EVERY` steps are launched before returning, so the
        device decodes while the caller turns finished requests into new ones (parsing, cropping, tokenizing) and
        while the next :meth:`_fill` prepares its inputs; that chunk is collected by the next poll. Slots freed by
        the last collect idle through it (a free slot decodes into :class:`SlotCache`'s dump column).

        Without :attr:`overlap`, requests submitted since the last poll are prefilled after the chunk in flight, in
        stream order, and decode in the next one. With it, they are prefilled on a side stream right after the next
        chunk is launched (so the host's part of the prefill, image processing included, runs while the device
        decodes), beside that chunk, and join the decoding slots at the first collect after their prefill finished."""
        self._polls += 1
        if not self._ready:
            if self.vision_ahead:
                self._encode_ahead()
            with self._decoding():
                if not (self._chunk and self.overlap):
                    self._fill()
                if not self._chunk:
                    self._join(block=not self._active())
                    if self._active():
                        self._advance(self._chunk_steps(False))
                        self._chunk = True
                if self._chunk and self._launches_first():
                    snap = self._snap
                    if snap.event is not None:  # the chunk in flight has finished (not a prefill queued after it)
                        snap.event.synchronize()
                    done = snap.tensors["done"].tolist()
                    # a row still decodes (rows that finished decode on through the next chunk, into their own cache
                    # past what they park), or joined since (a prefill after the chunk)
                    launch = any(r is not None and (r is not snap.rows[i] or not done[i])
                                 for i, r in enumerate(self._rows))
                    if launch:
                        self._mark_chunk()
                        self._advance(self._chunk_steps(False))
                    self._collect(snap)
                    self._chunk = launch
                elif self._chunk:
                    self._collect()
                    self._chunk = False
                    self._join(block=not self._active())
                    if self.pipeline and self._active():
                        cover = self.overlap and self._fill_due()
                        self._mark_chunk()
                        self._advance(self._chunk_steps(cover))
                        self._chunk = True
                        if self.overlap:
                            self._fill()
        done = list(self._ready)
        self._ready.clear()
        self._n_in_flight -= len(done)
        return done

    def _active(self) -> bool:
        return any(r is not None for r in self._rows)

    def _launches_first(self) -> bool:
        """Whether the next chunk is launched before the one in flight is collected (:attr:`launch_before_collect`,
        pipelined, without overlap)."""
        return self.launch_before_collect and self.pipeline and not self.overlap

    def _snapshot(self, n: int) -> None:
        """Copy the slots' results after the chunk of ``n`` steps just launched (finished flags, steps, tokens,
        log-probs) to host memory, in stream order: on a GPU into pinned buffers (two sets, alternating: the next
        chunk's copies are queued before this one's collect reads them) with an event to wait for."""
        st = self._st
        names = ("done", "step", "out_tok", "out_lp")
        if self.model.device.type != "cuda":
            self._snap = _Snapshot({k: st[k].clone() for k in names}, None, n, tuple(self._rows))
            return
        if not self._snap_bufs or self._snap_bufs[0]["out_tok"].shape != st["out_tok"].shape:
            self._snap_bufs = [{k: torch.empty(st[k].shape, dtype=st[k].dtype, pin_memory=True) for k in names}
                               for _ in range(2)]
        bufs = self._snap_bufs[0]
        self._snap_bufs.reverse()
        for k in names:
            bufs[k].copy_(st[k], non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.model.device))
        self._snap = _Snapshot(bufs, event, n, tuple(self._rows))

    def _chunk_steps(self, cover: bool) -> int:
        """Decode steps of the next chunk: :attr:`CHECK_EVERY`, or :attr:`PREFILL_COVER` when a prefill is launched
        beside it (at most :attr:`MAX_CHUNK`)."""
        return max(1, min(self.MAX_CHUNK, max(self.CHECK_EVERY, self.PREFILL_COVER) if cover else self.CHECK_EVERY))

    # -- streams (overlap on a GPU) -------------------------------------------------------------------------------
    def _cuda_streams(self) -> tuple | None:
        """``(decode stream, prefill stream)`` while overlapping on a GPU, else None."""
        if not self.overlap or self.model.device.type != "cuda":
            return None
        if not self._streams or self._streams[0] != self.decode_priority:
            dev = self.model.device
            self._streams = (self.decode_priority, torch.cuda.Stream(dev, priority=self.decode_priority),
                             torch.cuda.Stream(dev, priority=0))
        return self._streams[1:]

    @contextlib.contextmanager
    def _decoding(self):
        """Run the slots' work (decode chunks, host checks, joins) on the decode stream, after the caller's work."""
        streams = self._cuda_streams()
        if streams is None:
            yield
            return
        self._caller = torch.cuda.current_stream(self.model.device)
        streams[0].wait_stream(self._caller)
        try:
            with torch.cuda.stream(streams[0]):
                yield
        finally:
            self._caller = None

    def _after_streams(self) -> None:
        """Order the current stream's next work after everything launched on the decode, prefill and vision-ahead
        streams."""
        streams = list(self._streams[1:]) + ([self._ahead_stream_] if self._ahead_stream_ is not None else [])
        if streams:
            cur = torch.cuda.current_stream(self.model.device)
            for stream in streams:
                cur.wait_stream(stream)

    # -- vision ahead ---------------------------------------------------------------------------------------------

    def _cached_features(self, keys: list[Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """As the HF engine's; features encoded ahead were allocated on that stream: their memory is kept until the
        stream that reads them now (a prefill's, generate's) has done so, even if the cache drops them meanwhile."""
        out = super()._cached_features(keys)
        if self._ahead_stream_ is not None and out:
            cur = torch.cuda.current_stream(self.model.device)
            for f, _ in out.values():
                f.record_stream(cur)
        return out

    def _ahead_stream(self) -> Any:
        """The side stream images are encoded ahead on (a GPU), else None."""
        if self.model.device.type != "cuda":
            return None
        if self._ahead_stream_ is None:
            self._ahead_stream_ = torch.cuda.Stream(self.model.device)
        return self._ahead_stream_

    def _mark_chunk(self) -> None:
        """With :attr:`vision_ahead` on a GPU: an event on the caller's stream just before the pipelined decode chunk
        is launched: everything the caller queued before it (a weight update) is what the next poll's
        :meth:`_encode_ahead` must wait for, and the chunk itself is what it runs beside."""
        if self.vision_ahead and not self.overlap and self._ahead_stream() is not None:
            self._chunk_event = torch.cuda.Event()
            self._chunk_event.record(torch.cuda.current_stream(self.model.device))

    @torch.no_grad()
    def _encode_ahead(self) -> None:
        """The images of waiting requests that no prefill or earlier call has encoded (first seen: :meth:`_prepare`
        processed their pixels) go through the vision tower now, each distinct one once, and into the feature
        cache: their prefill then feeds the cached features (:meth:`_vision_inputs`) instead of running the tower on
        the decode's path. On a GPU this runs on a side stream after the caller's work but not after the decode
        chunk in flight, which it runs beside; a prefill's stream waits for it. (Qwen2-VL / Qwen2.5-VL with the
        feature cache: not with ``synced_gpus``.)"""
        if (not self._queue or self.synced_gpus or not self.dedupe_images
                or self.bundle.kind not in SHARED_IMAGE_KINDS):
            return
        self._drop_stale_features()
        # what the next prefills take: the latest requests (episodes' next turns, submitted since the last poll,
        # which continue their parked slots first) and a slot's worth of samples at the front of the queue; not
        # further back (a prefill waits for everything encoded ahead, and features encoded for a rollout's later
        # groups would leave the cache before their turn, to be encoded again)
        limit = min(2 * self.slots, self.FEATURE_CACHE // 2)  # images
        latest = list(itertools.islice(reversed(self._queue), self.slots))
        front, samples = [], 0
        for entry in self._queue:
            if samples >= self.slots:
                break
            front.append(entry)
            samples += len(entry[2]) - entry[3]
        taken = {id(e) for e in latest}
        keys: list[str] = []
        pix: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        for entry in latest + [e for e in front if id(e) not in taken]:
            if len(keys) >= limit:
                break
            prep = self._prepare(entry)
            if isinstance(prep, Exception) or prep.grid is None:
                continue
            for j, k in enumerate(prep.keys):
                if (isinstance(k, str) and prep.pixels[j] is not None and k not in self._features and k not in keys
                        and len(keys) < limit):
                    keys.append(k)
                    pix.append(prep.pixels[j])
                    rows.append(prep.grid[j])
        if not keys:
            return
        grid = torch.stack(rows)
        device = self.model.device
        stream = self._ahead_stream()
        if stream is not None:
            cur = torch.cuda.current_stream(device)
            if self._chunk and not self.overlap and self._chunk_event is not None:
                stream.wait_event(self._chunk_event)  # not the chunk: it runs beside it
            else:  # nothing in flight on the caller's stream, or the decode runs on its own stream
                stream.wait_stream(cur)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            pv = cat_to_device(pix, device).to(self.model.dtype)
            sharing = self._sharing(keys, grid, list(range(len(keys))), {}, check=False,
                                    tower_graphs=self._towers(ahead=True))
            with self._autocast(), fused_attention(device), sharing:
                self.model.model.get_image_features(pv, to_device(grid, device))
        self.ahead_images += len(keys)

    # -- slots ----------------------------------------------------------------------------------------------------
    def _state(self, device: torch.device) -> dict[str, Any]:
        if self._st is None:
            S, L, lng = self.slots, self.cache_len, {"dtype": torch.long, "device": device}
            mask = torch.zeros((S, 1, 1, L + 1), dtype=torch.bool, device=device)  # + SlotCache's dump column
            mask[..., 0] = True  # an idle slot sees one position (no all-masked row)
            self._st = {"cache": SlotCache(S, L, device), "mask": mask, "tok": torch.zeros((S, 1), **lng),
                        "pos": torch.zeros((3, S, 1), **lng), "step": torch.zeros(S, **lng),
                        "seeds": torch.zeros(S, **lng), "limit": torch.ones(S, **lng),
                        # MAX_CHUNK spare columns: a finished slot decodes on until the host collects it
                        "out_tok": torch.zeros((S, self.max_new_cap + self.MAX_CHUNK), **lng),
                        "out_lp": torch.zeros((S, self.max_new_cap + self.MAX_CHUNK), dtype=torch.float32,
                                              device=device),
                        "done": torch.ones(S, dtype=torch.bool, device=device),
                        "eos": to_device(torch.tensor(self.eos_ids or [-1], dtype=torch.long), device),
                        "suppress": (to_device(torch.tensor(self.suppress, dtype=torch.long), device)
                                     if self.suppress else None)}
        return self._st

    MIN_REUSE = 16  # shortest cached prefix worth continuing from
    PREFILL_WAIT = 4  # polls between prefills while fewer than prefill_min rows can start (and other slots decode)

    def _fill(self) -> None:
        """Start waiting requests in free slots, all in **one** prefill forward: an episode's next turn whose prompt
        extends a parked slot's cached tokens goes into that slot and only its new tokens are prefilled; the others
        take fresh slots (unparked ones first). While other slots decode, a prefill waits until a quarter of the
        slots can start or :attr:`PREFILL_WAIT` polls have passed since the last prefill: a prefill forward
        stalls every decoding slot, and one of many rows costs little more than one of a single row."""
        if not self._fill_due():
            return
        busy = self._active()
        if not busy:
            self._params = None  # drained: the next request may bring other sampling settings
        free = [i for i, r in enumerate(self._rows) if r is None]
        if self._parked:  # parked under other weights (an update since): their keys and values are stale
            now = weight_version(self.model)
            for slot in [i for i, pk in self._parked.items() if pk.version != now]:
                del self._parked[slot]
        items: list[_Start] = []
        for entry, slot, lcp, pk in self._continuations():
            items.append(_Start(slot, entry[0], entry[1], 0, entry[2][0], entry[4], lcp, pk))
            entry[3] = 1
            self._queue.remove(entry)
        taken = {it.slot for it in items}
        # parked slots last: their episode may come back; not before the caller has seen the poll that freed them
        # (with overlap this fill runs in that poll, after the collect: the episode's next turn is not submitted yet)
        free = ([i for i in free if i not in taken and i not in self._parked]
                + [i for i, pk in self._parked.items() if i not in taken and pk.poll < self._polls])
        used = 0
        while self._queue and used < len(free):
            entry = self._queue[0]
            group, req, seeds, start = entry[:4]
            if not self._compatible(req):
                break  # other sampling settings: wait until the slots drain
            prep = self._prepare(entry)
            take = min(len(seeds) - start, len(free) - used)  # a request's n samples may span fills
            for k in range(start, start + take):
                slot = free[used]
                pk = self._parked.pop(slot, None)  # what it holds may still share a prefix (a system prompt)
                lcp = self._reusable(prep, pk) if pk is not None and self._fits(entry, prep) else 0
                reuse = lcp >= self.MIN_REUSE
                items.append(_Start(slot, group, req, k, seeds[k], prep, lcp if reuse else 0, pk if reuse else None))
                used += 1
            entry[3] = start + take
            if entry[3] == len(seeds):
                self._queue.popleft()
        if items:
            self._prefill(items)
            self._prefilled_at = self._polls

    def _fill_due(self) -> bool:
        """Whether :meth:`_fill` would look for slots now: requests wait, no prefill is in flight, and either no slot
        decodes, or enough rows can start (:attr:`prefill_min`), or the oldest waited :attr:`PREFILL_WAIT` polls."""
        if not self._queue or self._pending is not None:  # one prefill in flight at a time
            return False
        if not self._active():
            return True
        free = sum(r is None for r in self._rows)
        waiting = sum(len(e[2]) - e[3] for e in self._queue)
        return (min(waiting, free) >= self.prefill_min
                or self._polls - max(self._queue[0][5], self._prefilled_at) >= self.PREFILL_WAIT)

    def _compatible(self, req: GenerationRequest) -> bool:
        """Whether ``req`` can run beside the slots' current sampling settings (which it sets when there are none)."""
        core = (req.params.temperature, req.params.top_p, req.params.top_k)
        if self._params is None:
            if core != self._params_core:  # sampling settings are part of the graphs (same ones: kept)
                self._drop_graphs()
            self._params, self._params_core = req.params, core
        return core == self._params_core

    GRID_CACHE = 4096  # string image keys whose patch grid is remembered

    def _prepare(self, entry) -> _Prepared | Exception:
        """A queued request's :class:`_Prepared` inputs (computed once), or an exception. ``pixels[j]`` is
        image ``j``'s processed pixels, or None for an image named by a string key whose grid an earlier request
        already gave: an episode's earlier images, usually in the slot's cache and then never processed again
        (:meth:`_prefill` processes them if a fresh prefill needs them after all)."""
        if entry[4] is None:
            req = entry[1]
            try:
                keys = self._image_keys(req)
                pixels: list[torch.Tensor | None] = [None] * len(keys)
                todo = [j for j, k in enumerate(keys) if not (isinstance(k, str) and k in self._grids)]
                early = {j: self._early[keys[j]] for j in todo if isinstance(keys[j], str) and keys[j] in self._early}
                for k in {keys[j] for j in early}:
                    del self._early[k]  # (once this request is prepared, the key's grid is known)
                now = [j for j in todo if j not in early]
                fresh = dict(zip(now, self._process([req.images[j] for j in now])))
                fresh.update({j: f.result() for j, f in early.items()})  # (a failure fails this request alone)
                rows = []
                for j, k in enumerate(keys):
                    if j in fresh:
                        pixels[j], g = fresh[j]
                        if isinstance(k, str):
                            self._grids[k] = g
                            while len(self._grids) > self.GRID_CACHE:
                                self._grids.popitem(last=False)
                    else:
                        g = self._grids[k]
                    rows.append(g)
                grid = torch.stack(rows) if rows else None
                ids = self.expand(req.prompt_ids, grid)
                entry[4] = _Prepared(ids, pixels, grid, keys, self._image_runs(ids))
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                entry[4] = e
        return entry[4]

    def _process_early(self, req: GenerationRequest) -> None:
        """With :attr:`prepare_threads`: start processing the request's images that no earlier request named (string
        keys not seen yet, not already started), each key once, in the background (:meth:`_prepare` takes them)."""
        for k, img in zip(self._image_keys(req), req.images):
            if isinstance(k, str) and k not in self._grids and k not in self._early:
                if self._executor is None:
                    import concurrent.futures

                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        self.prepare_threads, thread_name_prefix="vigorl-prepare")
                self._early[k] = self._executor.submit(lambda im=img: self._process([im])[0])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        super().close()

    def _process(self, images: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(pixels, grid row)`` per image, processed in one call."""
        if not images:
            return []
        pv, grid = self.encode_images(images)
        sizes = grid.prod(-1).tolist()
        return list(zip(torch.split(pv, sizes), grid))

    def _max_new(self, req: GenerationRequest) -> int:
        return min(int(req.params.max_new_tokens), self.max_new_cap)

    def _fits(self, entry, prep) -> bool:
        """Whether the prepared prompt plus its token limit fits a slot (else :meth:`_prefill` fails the request)."""
        return not isinstance(prep, Exception) and len(prep.ids) + self._max_new(entry[1]) <= self.cache_len

    def _continuations(self) -> list[tuple[list, int, int, _Parked]]:
        """``(queue entry, parked slot, reused tokens, what the slot held)`` for the waiting single-sample requests
        that continue a parked slot's cached prefix (an episode's next turn), longest reuse first, each entry and
        slot at most once. Candidates are the parked slots whose first image is the request's first image (an
        episode keeps its image; other episodes share at most a system prompt, which the fresh-slot path reuses too),
        or every parked slot for a request without images."""
        if not self._parked:
            return []
        by_image: dict[Any, list[int]] = {}
        for slot, pk in self._parked.items():
            by_image.setdefault(pk.image_keys[0] if pk.image_keys else None, []).append(slot)
        cands = []
        for order, entry in enumerate(self._queue):
            if entry[3] != 0 or len(entry[2]) != 1 or not self._compatible(entry[1]):
                continue
            keys = self._image_keys(entry[1])
            slots = by_image.get(keys[0], ()) if keys else self._parked
            if not slots:
                continue  # not prepared (its pixels processed) before it is placed: a long queue stays cheap
            prep = self._prepare(entry)
            if not self._fits(entry, prep):
                continue
            for slot in slots:
                n = self._reusable(prep, self._parked[slot])
                if n >= self.MIN_REUSE:
                    cands.append((-n, order, slot, entry))
        cands.sort(key=lambda c: c[:3])
        out, used_slots, used_entries = [], set(), set()
        for neg, _, slot, entry in cands:
            if slot in used_slots or id(entry) in used_entries:
                continue
            used_slots.add(slot)
            used_entries.add(id(entry))
            out.append((entry, slot, -neg, self._parked.pop(slot)))
        return out

    @torch.no_grad()
    def _prefill(self, items: list[_Start]) -> None:
        """One forward for every starting row: row ``b`` (slot ``rows[b]``) feeds the tokens of its prompt after the
        ``reused`` ones its slot already holds, left-padded so that every row's last token is the last column; its
        keys and values go to cache positions ``reused ..`` (:class:`SlotCache`; every slot's sequence starts at
        position 0), and its queries see the slot's positions causally. M-RoPE positions come from the model's
        ``get_rope_index`` over the fed tokens, shifted past the held prefix's; the vision tower sees only the new
        images."""
        from vigorl_cli.models.load import mm_token_type_ids

        device = self.model.device
        st = self._state(device)
        todo: list[_Start] = []
        for t in items:
            if isinstance(t.prep, Exception):
                self._finish_row(t.group, t.index, Completion([], "", [], "error", None,
                                                              f"{type(t.prep).__name__}: {t.prep}"))
                continue
            t.max_new = self._max_new(t.req)
            if len(t.prep.ids) + t.max_new > self.cache_len:
                self._finish_row(t.group, t.index, Completion(
                    [], "", [], "error", None,
                    f"prompt ({len(t.prep.ids)}) + max_new_tokens ({t.max_new}) exceed the cache length "
                    f"{self.cache_len}"))
                continue
            todo.append(t)
        if not todo:
            return
        # rows whose whole prompt another row also has (a GRPO group's first turns, a request's n samples): fed once,
        # its keys and values then copied to their slots (as vLLM's prefix caching computes them once)
        todo, copies = self._shared(todo) if self.share_prompts else (todo, [])
        n = len(todo)
        lens = [len(t.prep.ids) for t in todo]
        news = [ln - t.reused for ln, t in zip(lens, todo)]  # tokens to feed per row
        W = max(news)
        feed = torch.full((n, W), self.pad_id, dtype=torch.long)  # what the slot already holds is not fed again
        dst = torch.full((n, W), st["cache"].dump, dtype=torch.long)
        new_images: list[tuple[int, int]] = []  # (row, image) to encode: those after the slot's cached prefix
        grids_new = []
        for b, t in enumerate(todo):
            feed[b, W - news[b]:] = torch.tensor(t.prep.ids[t.reused:], dtype=torch.long)
            dst[b, W - news[b]:] = torch.arange(t.reused, lens[b])
            if t.prep.grid is not None:
                first_new = t.prep.images_in(t.reused)
                grids_new.append(t.prep.grid[first_new:])
                new_images += [(b, j) for j in range(first_new, t.prep.grid.shape[0])]
        valid = dst != st["cache"].dump
        # M-RoPE positions on the host (get_rope_index walks rows and images in Python: a device sync per step on a
        # GPU), of the fed tokens only: a segment starts one past the largest position before it, so the positions
        # of what follows a cached prefix are its own positions shifted by where the prefix ends (the prefix never
        # ends inside an image: _reusable)
        pos = prompt_positions(self.model, feed, valid.long(), mm_token_type_ids(feed, self.model.config),
                               torch.cat(grids_new) if grids_new else None)  # [3, n, W]
        for b, t in enumerate(todo):
            before = t.held.prefix(t.reused) if t.reused else torch.zeros((3, 0), dtype=torch.long)
            if t.reused:
                pos[:, b] += int(before[:, -1].max()) + 1
            t.positions = torch.cat([before, pos[:, b, W - news[b]:]], dim=1)
        streams = self._cuda_streams()
        if streams is not None:  # beside the decode chunks, after the caller's work (weights)
            streams[1].wait_stream(self._caller or torch.cuda.current_stream(device))
        with torch.cuda.stream(streams[1]) if streams is not None else contextlib.nullcontext():
            # (no copy here waits for the decode chunk in flight: the prefill's host work overlaps its device time)
            pos, feed, dst = (to_device(x, device) for x in (pos, feed, dst))
            read = max(lens)
            qpos = dst.masked_fill(dst == st["cache"].dump, 0)  # a padding query sees the slot's first key
            see = torch.arange(read, device=device)[None, None] <= qpos[:, :, None]  # [n, W, read]: causal
            extra, features = self._vision_inputs(todo, new_images, device)
            cache = st["cache"]
            cache.rows, cache.dst, cache.read = to_device(torch.tensor([t.slot for t in todo]), device), dst, read
            graphed = self._graphed_lm(cache) if self.prefill_graphs else contextlib.nullcontext()
            plain = eager(self.model) if self.prefill_eager else contextlib.nullcontext()
            try:  # shapes change every prefill: no per-shape cuDNN planning (vision_attention.fused_attention)
                with self._autocast(), fused_attention(device), features, graphed, plain:
                    out = self.model(input_ids=feed, attention_mask=see[:, None], position_ids=pos,
                                     past_key_values=cache, use_cache=True, logits_to_keep=1,
                                     mm_token_type_ids=mm_token_type_ids(feed, self.model.config),
                                     **extra)
            finally:
                cache.rows, cache.dst, cache.read = None, None, 0
            logits = out.logits[:, -1]
            if copies:
                at = {id(t): b for b, t in enumerate(todo)}
                src = to_device(torch.tensor([at[id(s)] for _, s in copies]), device)
                cache.copy(to_device(torch.tensor([s.slot for _, s in copies]), device),
                           to_device(torch.tensor([c.slot for c, _ in copies]), device),
                           max(len(c.prep.ids) for c, _ in copies))
                logits = torch.cat([logits, logits[src]])
                for c, s in copies:
                    c.positions = s.positions
            event = torch.cuda.Event() if streams is not None else None
            if event is not None:
                event.record(streams[1])
        self._pending = _Pending(todo + [c for c, _ in copies], logits, weight_version(self.model), event,
                                 self._collects)
        self.shared_tokens += sum(len(c.prep.ids) - c.reused for c, _ in copies)
        self.reused_tokens += sum(t.reused for t in todo)
        self.prefills += 1
        self.prefill_tokens[0] += sum(news)
        self.prefill_tokens[1] += n * W
        if not self.overlap:
            self._join(block=True)

    @staticmethod
    def _shared(todo: list[_Start]) -> tuple[list[_Start], list[tuple[_Start, _Start]]]:
        """``(rows to feed, [(copy, source)])``: of the rows with the same prompt (tokens and image keys) only one is
        fed — the one whose slot already holds the most of it — and the others copy its slot's keys and values."""
        first, occ = distinct_images([(tuple(t.prep.ids), tuple(t.prep.keys)) for t in todo])
        src = list(first)  # per distinct prompt: the row to feed
        for i, u in enumerate(occ):
            if todo[i].reused > todo[src[u]].reused:
                src[u] = i
        feed = [todo[i] for i in src]
        return feed, [(t, todo[src[u]]) for i, (t, u) in enumerate(zip(todo, occ)) if i != src[u]]

    @contextlib.contextmanager
    def _graphed_lm(self, cache: SlotCache):
        """During one prefill forward: the language model runs through :class:`_PrefillGraphs` (the vision tower,
        embeddings and LM head stay eager)."""
        lm = getattr(getattr(self.model, "model", None), "language_model", None)
        if lm is None:
            yield
            return
        if self._lm_graphs is None or self._lm_graphs.lm is not lm:
            self._lm_graphs = _PrefillGraphs(lm, self.slots, self.cache_len, self.READ_BUCKET)
        graphs = self._lm_graphs
        graphs.row_step = self.PREFILL_ROW_STEP
        cuda = self.model.device.type == "cuda" and self.use_graphs is not False
        held = self.overlap and not self.OVERLAP_PREFILL_GRAPHS
        if cuda and held and not self._overlap_warned:
            warnings.warn("engine.prefill_graphs: no CUDA graphs with engine.prefill_overlap (a GPU hang was seen "
                          "with both; docs/performance.md); the prefills run eagerly at bucketed shapes", stacklevel=3)
            self._overlap_warned = True
        graphs.use_graphs = cuda and not held and graphs.capture_error is None
        original = lm.forward

        def forward(*args, **kw):
            return graphs(original, cache, args, kw)

        with override(lm, "forward", forward):
            yield

    def _join(self, block: bool) -> None:
        """Start the rows of the prefill in flight (sample their first token, set their decode state): now if
        ``block`` (on the decode stream, after the prefill stream's forward), else only if a host check (collect)
        came since its launch and its forward has finished. Until then its slots decode into the dump column."""
        p = self._pending
        if p is None or not block and (self._collects == p.collects or
                                       (p.event is not None and not p.event.query())):
            return
        self._pending = None
        device = self.model.device
        if p.event is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(p.event)
            p.logits.record_stream(stream)  # allocated on the prefill stream, read on this one
        rows = to_device(torch.tensor([t.slot for t in p.todo], dtype=torch.long), device)
        ends = to_device(torch.tensor([len(t.prep.ids) for t in p.todo], dtype=torch.long), device)
        seen = torch.arange(self.cache_len + 1, device=device)[None] < ends[:, None]
        last_pos = to_device(torch.tensor([int(t.positions.max()) for t in p.todo], dtype=torch.long), device)
        self._start(rows, p.logits, [t.seed for t in p.todo], [t.max_new for t in p.todo], last_pos, ends, seen)
        for t in p.todo:
            self._rows[t.slot] = _Row(t.group, t.index, t.max_new, t.req.params, t.prep.ids, t.prep.keys, p.version,
                                      t.positions)

    def _vision_inputs(self, todo: list, new_images: list[tuple[int, int]], device: torch.device) -> tuple[dict, Any]:
        """The pixel inputs of the images a prefill feeds (``(row, image)`` pairs), and a context in which the model
        gets their features. As in :meth:`HFEngine.generate`: every distinct image (by key) is encoded once — a GRPO
        group's episodes start from the same image — and not at all when the engine's feature cache holds it (an
        episode's earlier images, when its next turn could not continue its slot)."""
        if not new_images:
            return {}, contextlib.nullcontext()
        if self._ahead_stream_ is not None:  # features encoded ahead: written on that stream
            torch.cuda.current_stream(device).wait_stream(self._ahead_stream_)
        keys = [todo[b].prep.keys[j] for b, j in new_images]
        grid_occ = torch.cat([todo[b].prep.grid[j:j + 1] for b, j in new_images])  # [occurrences, 3]
        share = self.dedupe_images and self.bundle.kind in SHARED_IMAGE_KINDS
        first, occ = distinct_images(keys) if share else (list(range(len(keys))), list(range(len(keys))))
        ukeys = [keys[i] for i in first]
        known = self._cached_features(ukeys) if share else {}
        need = [new_images[first[u]] for u in range(len(first)) if u not in known]  # to encode, in order
        self.prefill_images += len(need)
        missing = [(b, j) for b, j in need if todo[b].prep.pixels[j] is None]  # not processed yet (_prepare)
        for (b, j), (pv, _) in zip(missing, self._process([todo[b].req.images[j] for b, j in missing])):
            todo[b].prep.pixels[j] = pv
        pix = [todo[b].prep.pixels[j] for b, j in need]
        pv = cat_to_device(pix or [torch.zeros((0, self._pixel_dim), dtype=torch.float32)], device)
        extra = {"pixel_values": pv.to(self.model.dtype), "image_grid_thw": to_device(grid_occ, device)}
        if not share:
            return extra, contextlib.nullcontext()
        # no placeholder-count check: ids were expanded from these grids, and its host sync would block the host
        # while the prefill runs beside the decode
        return extra, self._sharing(ukeys, grid_occ[first], occ, known, check=False, tower_graphs=self._towers())

    def _towers(self, ahead: bool = False) -> TowerGraphs | None:
        """With :attr:`vision_graphs`: the vision tower's :class:`TowerGraphs` (graphs on a GPU), else None; the
        prefills' and :meth:`_encode_ahead`'s are two (a prefill's tower may replay beside the stream ahead)."""
        visual = getattr(getattr(self.model, "model", None), "visual", None)
        if not self.vision_graphs or visual is None:
            return None
        attr = "_ahead_towers" if ahead else "_tower_graphs"
        tg = getattr(self, attr)
        if tg is None or tg.visual is not visual:
            tg = TowerGraphs(visual)  # (each its own capture lane: the two may replay side by side)
            setattr(self, attr, tg)
        tg.use_graphs = self.model.device.type == "cuda" and self.use_graphs is not False
        return tg

    def _start(self, rows: torch.Tensor, logits: torch.Tensor, seeds: list[int], limits: list[int],
               last_pos: torch.Tensor, cur: torch.Tensor, mask_rows: torch.Tensor) -> None:
        """Sample the first token of freshly prefilled slots and set their decode state."""
        st = self._st
        device = rows.device
        seeds_t = to_device(torch.tensor([s & 0x7FFF_FFFF_FFFF_FFFF for s in seeds], dtype=torch.long), device)
        chosen, lp = sample_next(logits.float(), None, self._params, seeds_t, st["suppress"], 0)
        lim = to_device(torch.tensor(limits, dtype=torch.long), device)
        st["seeds"][rows] = seeds_t
        st["step"][rows] = 0
        st["limit"][rows] = lim
        st["out_tok"][rows, 0] = chosen
        st["out_lp"][rows, 0] = lp
        st["tok"][rows, 0] = chosen
        st["done"][rows] = (chosen[:, None] == st["eos"][None, :]).any(-1) | (lim <= 1)
        st["pos"][:, rows, 0] = last_pos[None, :].expand(3, -1) + 1
        st["cache"].pos[rows] = cur
        st["mask"][rows, 0, 0] = mask_rows

    def _image_runs(self, ids: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's placeholder run in expanded ``ids``."""
        runs, i = [], 0
        while i < len(ids):
            if ids[i] == self.image_token_id:
                j = i
                while j < len(ids) and ids[j] == self.image_token_id:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        return runs

    def _reusable(self, prep: _Prepared, pk: _Parked) -> int:
        """How many leading tokens of the prompt the parked cache holds: the common prefix, cut back to the start of
        the first image it would split or whose image differs (placeholders alone cannot tell images apart)."""
        ids = prep.ids
        n = common_prefix(ids, pk.tokens, min(len(ids) - 1, len(pk.tokens)))  # >= 1 token left to prefill
        for j, (start, end) in enumerate(prep.runs):
            if start >= n:
                break
            if n < end or j >= len(pk.image_keys) or prep.keys[j] != pk.image_keys[j]:
                return start
        return n

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self) -> None:
        """One decode step of every slot. Capture-safe: no host sync, fixed shapes."""
        st = self._st
        cache = st["cache"]
        st["mask"].scatter_(3, cache.pos.view(-1, 1, 1, 1), True)
        out = self.model(input_ids=st["tok"], attention_mask=st["mask"], position_ids=st["pos"],
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        st["step"].add_(1)
        chosen, lp = sample_next(out.logits[:, -1].float(), None, self._params, st["seeds"], st["suppress"],
                                 st["step"])
        col = st["step"].clamp(max=st["out_tok"].shape[1] - 1)
        st["out_tok"][cache.arange, col] = chosen
        st["out_lp"][cache.arange, col] = lp
        st["done"] |= (chosen[:, None] == st["eos"][None, :]).any(-1) | (st["step"] + 1 >= st["limit"])
        st["tok"].copy_(chosen[:, None])
        st["pos"].add_(1)
        cache.pos.add_(1).clamp_(max=self.cache_len)  # past the end: the dump column

    READ_BUCKET = 512  # decode attention reads the cache up to a multiple of this (0: always the whole cache)

    def _read_width(self, n: int) -> int:
        """How many cache positions the next ``n`` decode steps must attend to: past every busy slot's position
        after them, rounded up to :attr:`READ_BUCKET` (one captured graph per width). Slots without a request write
        beyond it harmlessly (what they attend to is never used)."""
        full = self.cache_len + 1
        if not self.READ_BUCKET:
            return full
        need = max((len(r.prompt) + r.steps for r in self._rows if r is not None), default=0) + n + 1
        if self._chunk and self._launches_first():
            need += self._snap.n  # the chunk in flight (this one is launched before its collect): not in r.steps yet
        return min(full, -(-need // self.READ_BUCKET) * self.READ_BUCKET)

    @torch.no_grad()
    def _advance(self, n: int) -> None:
        device = self.model.device
        graphs = device.type == "cuda" and self.use_graphs is not False
        if self._graphs and self._graph_weights != (weight_addresses(self.model), self.decode_backend):
            self._drop_graphs()  # parameters moved or another attention backend: capture again
        n = min(n, self.MAX_CHUNK)  # a finished slot's tokens land in the MAX_CHUNK spare columns until collected
        width = self._read_width(n)
        self._st["cache"].width = width
        self.decode_steps += n
        with decode_attention(self.model, self.decode_backend):
            k = 0
            while k < n:
                if graphs and width in self._graphs:
                    self._graphs[width].replay()
                elif graphs and self._eager_steps >= self.WARMUP_STEPS:
                    graph, err = capture_step(self._step, self._autocast(), self._lane)
                    if graph is None:
                        self.capture_error, self.use_graphs, graphs = err, False, False
                    else:
                        self._graphs[width] = graph
                        self.captures += 1
                        self._graph_weights = (weight_addresses(self.model), self.decode_backend)
                    continue
                elif graphs:
                    side = capture_stream(self._lane)  # warm up where the step is captured
                    side.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(side), self._autocast():
                        self._step()
                    torch.cuda.current_stream(device).wait_stream(side)
                    self._eager_steps += 1
                else:
                    with self._autocast():
                        self._step()
                k += 1
        if self._launches_first():
            self._snapshot(n)

    def _drop_graphs(self) -> None:
        """All the decode graphs at once, before any is captured again (their lane's rule: capture_stream)."""
        self._graphs, self._eager_steps = {}, 0

    def _collect(self, snap: _Snapshot | None = None) -> None:
        """Finished slots (eos, token limit, stop string) → completions; their slots become free. From ``snap``
        (the results copied right after an earlier chunk, while a later one decodes: rows that joined after that
        chunk are not in it; :meth:`poll` has waited for its copy) or else from the device (which waits for
        everything launched)."""
        st = snap.tensors if snap is not None else self._st
        self._collects += 1
        done = st["done"].tolist()
        steps = st["step"].tolist()
        active = [i for i, r in enumerate(self._rows) if r is not None and (snap is None or r is snap.rows[i])]
        width = max((steps[i] for i in active), default=0) + 1  # columns written so far (not the whole buffer)
        toks = st["out_tok"][active, :width].tolist() if active else []
        lps = st["out_lp"][active, :width].tolist() if active else []
        freed = []
        for j, slot in enumerate(active):
            row = self._rows[slot]
            row.steps = steps[slot]
            n = min(steps[slot] + 1, row.max_new)
            tokens = toks[j][:n]
            if not done[slot] and not (row.params.stop and self._cut(tokens, row.params,
                                                                      max(0, row.checked - 1)) is not None):
                row.checked = len(tokens)  # a stop string may end in the next token: rescan from the last one
                continue
            comp = self._finish(tokens, lps[j][:n], row.params)
            self._rows[slot] = None
            freed.append(slot)
            # what the slot's cache holds: the prompt and every sampled token fed back so far (a token's keys and
            # values depend only on the tokens before it, so any of them that the next prompt repeats is reusable)
            fed = toks[j][:min(steps[slot], st["out_tok"].shape[1] - 1, self.cache_len - len(row.prompt))]
            self._parked[slot] = _Parked(row.prompt + fed, row.image_keys, row.version, self._polls, row.positions)
            self._finish_row(row.group, row.index, comp)
        if freed:  # from the next step on, what they hold stays intact (a next turn, or a prefill beside the decode)
            cache = self._st["cache"]
            cache.pos[freed] = cache.dump

    def _finish_row(self, group: dict, k: int, comp: Completion) -> None:
        group["out"][k] = comp
        group["left"] -= 1
        if group["left"] == 0:
            self._ready.append((group["tag"], group["out"]))

