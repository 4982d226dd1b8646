"""Our own decode loop over a static KV cache: one CUDA graph per decode step, forward *and* sampling.

Why not ``generate(cache_implementation="static")``: transformers then compiles the model's forward into CUDA graphs,
but everything around it stays eager Python per token — input preparation, the 4-D mask, our sampler (a few dozen
small kernels), the stopping criteria and a host synchronisation to ask whether every row has finished. At B=32 on an
H200 that left ~12.7 ms per step where the graph itself is a few ms (docs/performance.md). Here one decode step —
mask update, forward through the static cache, seeded sampling, recording the token and its raw log-prob, advancing
the positions — is captured once with ``torch.cuda.graph`` and replayed; the host looks at the tokens every
:attr:`StaticDecoder.CHECK_EVERY` steps (all rows finished? a stop string?) instead of every step. No
``torch.compile``: capturing the eager kernels needs no compile time, and the graph is reused across calls of the
same batch size and cache length (prompt widths are bucketed by the engine).

Exactness: the same prompt positions (the model's own ``get_rope_index``), the same masks, the same sampling function
(:func:`vigorl_cli.engines.hf.sample_next`) as the ``generate`` path, so tokens and raw log-probs equal those of the
dynamic cache (tested on CPU, where the loop runs the same step function eagerly). Rows that finished keep decoding
until the next check; what follows an eos or stop string is cut by the engine as for ``generate``.

Only the Qwen-VL families (mrope positions from ``get_rope_index``) with sdpa or eager attention take this path; the
engine falls back to ``generate`` with a static cache otherwise.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SUPPORTED_KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


DECODE_IMPL = "vigorl_decode"
_registered = False
# sdpa backends the decode attention may use (``decode_backend``), set while :func:`decode_attention` is active;
# empty: torch's own choice
_SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
DECODE_BACKENDS = tuple(_SDPA)
_backends: list = []


def _sdpa_backends(name: str | None) -> list:
    """``decode_backend`` → the ``torch.nn.attention.SDPBackend`` list for ``sdpa_kernel`` (``None``/``"auto"``:
    none, torch chooses)."""
    if name in (None, "auto"):
        return []
    if name not in _SDPA:
        raise ValueError(f"decode_backend {name!r}: choose auto, " + ", ".join(DECODE_BACKENDS))
    return [_SDPA[name]]


def _decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs):
    """HF attention-interface signature. One query token per row (a decode step) over a grouped-query cache: the
    ``G = Hq / Hkv`` query heads that share a key/value head become ``G`` queries of one sdpa head, so sdpa runs on
    the cache as stored. HF's sdpa path instead repeats every key/value head ``G`` times whenever a mask is given
    (a static cache always needs one for its unwritten and padding slots): at B=32 and a 512-slot cache that copy
    moves more bytes per step than the weights. Prefill (several query tokens) is HF's sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if T != 1 or Hq == Hkv or Hq % Hkv or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(B, Hkv, Hq // Hkv, D)  # kv head j serves query heads j*G .. (j+1)*G - 1 (repeat_kv's order)
    mask = attention_mask[:, :, :, : key.shape[2]]  # [B, 1, 1, L]: the same slots for every query of a row
    with sdpa_kernel(_backends) if _backends else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(B, Hq, 1, D).transpose(1, 2), None  # [B, 1, Hq, D]


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(DECODE_IMPL, _decode_attention)
        _registered = True


@contextlib.contextmanager
def decode_attention(model: torch.nn.Module, backend: str | None = None):
    """Route the language model's attention through :func:`_decode_attention` (sdpa models only) for a while;
    ``backend``: the one sdpa backend its decode steps use (:data:`DECODE_BACKENDS`; None: torch's choice)."""
    global _backends
    from vigorl_cli.models.packed_attention import IMPL, _text_config

    text = _text_config(model)
    impl = getattr(text, "_attn_implementation", None)
    backends = _sdpa_backends(backend)  # (an unknown name fails before anything changes)
    if impl not in ("sdpa", IMPL):  # vigorl_sdpa is HF's sdpa outside packed plans
        yield
        return
    _register()
    text._attn_implementation = DECODE_IMPL
    saved, _backends = _backends, backends
    try:
        yield
    finally:
        text._attn_implementation = impl
        _backends = saved


def _rope_owner(model: torch.nn.Module) -> Any | None:
    """The submodule that computes Qwen-VL's 3-D (mrope) positions (``get_rope_index``), through peft wrappers."""
    for m in model.modules():
        if callable(getattr(m, "get_rope_index", None)):
            return m
    return None


def _attn_implementation(model: torch.nn.Module) -> str:
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    return str(getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", "eager"))


def supports(model: torch.nn.Module, kind: str) -> bool:
    """Whether :class:`StaticDecoder` can drive this model (else the engine uses ``generate``)."""
    from vigorl_cli.models.packed_attention import IMPL

    return kind in SUPPORTED_KINDS and _rope_owner(model) is not None and _attn_implementation(model) in (
        "sdpa", "eager", IMPL)


def prompt_positions(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
    """``[3, B, W]`` mrope positions of left-padded prompts, computed by the model's own ``get_rope_index``
    (text-only prompts: the running count of real tokens on all three axes, as transformers does)."""
    if image_grid_thw is None:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1).contiguous()
    owner = _rope_owner(model)
    params = inspect.signature(owner.get_rope_index).parameters
    kw: dict[str, Any] = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in params:
        kw["mm_token_type_ids"] = mm_token_type_ids
    pos, _ = owner.get_rope_index(input_ids, **kw)
    return pos


def prompt_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, W, W]`` boolean attention of left-padded prompts (``valid``: ``[B, W]`` real tokens): causal over real
    keys; a padding query sees itself, so no row is all-masked (its output is never used)."""
    W = valid.shape[1]
    i = torch.arange(W, device=valid.device)
    see = (i[None, :] <= i[:, None])[None] & valid[:, None, :]
    return see | torch.eye(W, dtype=torch.bool, device=valid.device)[None]


def weight_addresses(module: torch.nn.Module) -> tuple:
    """Where the parameters live: a captured graph reads them there, so a change means capturing again."""
    return tuple(p.data_ptr() for p in module.parameters())


def weight_version(module: torch.nn.Module) -> int:
    """Changes whenever a parameter is modified in place (an optimizer step, a weight sync): autograd's version
    counters, which every in-place op bumps, with or without grad."""
    return sum(p._version for p in module.parameters())


def capture_step(step: Any, autocast: Any, lane: str) -> tuple[Any, str | None]:
    """Record ``step()`` (one capture-safe decode step) as a CUDA graph on ``lane`` (:func:`capture_stream`):
    ``(graph, None)``. If the model's forward cannot be captured (a host sync or a host tensor inside it), say so
    once and return ``(None, reason)``: the caller keeps decoding eagerly (same tokens, only slower). Capturing does
    not run the step."""
    def run() -> None:
        with autocast:
            step()

    g, _, err = capture_call(run, None, "static decode", lane=lane)
    return g, err


class _Expanded:
    """A cache seen through a prefill of distinct prompts: batch row ``u`` of the forward is every cache row ``b`` with
    ``rows[b] == u``. Each layer's new keys and values go to all of those rows; attention reads one of them (they are
    equal). Everything else is the wrapped cache's."""

    def __init__(self, cache: Any, rows: list[int], device: torch.device):
        self._cache = cache
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        first: dict[int, int] = {}
        for b, u in enumerate(rows):
            first.setdefault(u, b)
        self._first = torch.tensor([first[u] for u in range(len(first))], dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        k, v = self._cache.update(key_states[self.rows], value_states[self.rows], layer_idx, *args, **kwargs)
        return k[self._first], v[self._first]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


_capture_streams: dict[tuple, Any] = {}
_lane_numbers = itertools.count()


def new_lane(owner: str) -> str:
    """A capture lane (:func:`capture_stream`) for a new owner of graphs: never one a former owner had (an id could
    come back while the former owner's graphs still wait to be collected)."""
    return f"{owner}-{next(_lane_numbers)}"


def capture_stream(lane: str) -> Any:
    """The side stream that the CUDA graphs of ``lane`` are captured on (one per lane and device).

    PyTorch keys cuBLAS workspaces by stream, and a captured graph keeps its capture stream's workspace address
    (pytorch/pytorch#193402), so graphs captured on one stream share one workspace: (1) two of them replaying at the
    same time on different streams — the decode steps beside a prefill on the overlap's prefill stream, the vision
    tower ahead beside the decode — write it at once (a hang was seen with prefill graphs beside the overlapped
    decode: docs/performance.md); (2) destroying one of them releases the stream's workspace that the others still
    use (torch 2.11 does so when a graph is reset). Hence one lane per owner of graphs — the streaming engine's
    decode steps, a :class:`StaticDecoder`'s, each :class:`GraphCache` — and **an owner drops its graphs all
    together, before it captures again** (never one graph while others of its lane live). Eager warm-up steps
    before a capture run on the lane's stream too. (Streams come from PyTorch's pool of 32 per priority: lanes stay
    distinct while a process makes fewer streams than that.)"""
    key = (lane, torch.cuda.current_device())
    if key not in _capture_streams:
        _capture_streams[key] = torch.cuda.Stream()
    return _capture_streams[key]


class _OtherCaptureAPI(Exception):
    """This torch's ``CUDAGraph.capture_begin`` takes other arguments: capture with ``torch.cuda.graph`` instead."""


@contextlib.contextmanager
def _capturing(graph: Any, pool: Any, lane: str):
    """``torch.cuda.graph(graph, pool=pool)`` without what it does first besides synchronising: emptying the device
    allocator's cache and the pinned host cache (``torch.cuda.graph`` does both at every capture, so the prefills
    after a capture mid-run allocate device memory and pinned buffers afresh: the profile's ``cudaHostAlloc``
    calls). Captured on ``lane``'s side stream (:func:`capture_stream`)."""
    torch.cuda.synchronize()
    with torch.cuda.stream(capture_stream(lane)):
        try:
            if pool is not None:
                graph.capture_begin(pool)
            else:
                graph.capture_begin()
        except (TypeError, AttributeError) as e:  # another torch's capture API
            raise _OtherCaptureAPI from e
        try:
            yield
        finally:
            graph.capture_end()


def capture_call(fn: Any, pool: Any, what: str, lane: str) -> tuple[Any, Any, str | None]:
    """Record ``fn()`` as a CUDA graph in memory pool ``pool`` (not run), on ``lane``'s capture stream
    (:func:`capture_stream`): ``(graph, fn's output, None)``, or ``(None, None, reason)`` after saying once why it
    could not be captured (a host sync or a host tensor inside), so that the caller runs it eagerly. The output's
    memory is the graph's: every replay overwrites it."""
    graph = torch.cuda.CUDAGraph()
    try:
        with _capturing(graph, pool, lane):
            out = fn()
    except _OtherCaptureAPI:  # its own context manager then (it empties the caches)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=capture_stream(lane)):
                out = fn()
        except RuntimeError as e:
            return _capture_failed(e, what)
    except RuntimeError as e:
        return _capture_failed(e, what)
    return graph, out, None


def _capture_failed(e: Exception, what: str) -> tuple[None, None, str]:
    err = f"{type(e).__name__}: {e}".splitlines()[0]
    warnings.warn(f"{what}: capture failed, running eagerly ({err})", stacklevel=4)
    torch.cuda.synchronize()
    return None, None, err


def replay_mismatch(replayed: torch.Tensor, eager: torch.Tensor, tolerance: float = 2e-2) -> str | None:
    """A new CUDA graph's first replay against the eager forward of the same inputs: None if they agree (within
    ``tolerance`` of the eager output's largest magnitude, what another kernel choice explains), else why not. One
    host sync: meant for once per capture."""
    if not eager.numel():
        return None
    diff = (replayed.float() - eager.float()).abs().max().item()
    scale = eager.float().abs().max().item()
    if diff <= tolerance * max(1.0, scale):
        return None
    return f"a replay differed from the eager forward (max abs diff {diff:.3g}, scale {scale:.3g})"


class GraphCache:
    """CUDA graphs by key in one memory pool (all dropped when :attr:`KEEP` are held and another is due), each kept
    only once its first replay agrees with the eager forward of the same inputs (:func:`replay_mismatch`). A failed
    capture or a disagreeing replay turns capturing off (``capture_error``, said once in a warning). ``module``: the
    parameters the graphs read (moved parameters make them stale). Captured on a lane of its own
    (:func:`capture_stream`). Used by the streaming engine's prefill graphs and the vision tower's graphs."""

    KEEP = 32
    TOLERANCE = 2e-2
    WHAT = "CUDA graphs"

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.lane = new_lane(type(self).__name__)  # its own capture stream (capture_stream)
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()  # key → what a replay needs
        self.seen: dict[tuple, int] = {}  # key → sightings
        self.pool = None
        self.weights: tuple = ()  # parameter addresses when the graphs were captured
        self.use_graphs = False
        self.captures = self.replays = 0
        self.capture_error: str | None = None

    def stale(self) -> bool:
        """Graphs captured with parameters that have moved since (they would read the old addresses)."""
        return bool(self.graphs) and self.weights != weight_addresses(self.module)

    def _record(self, fn: Any) -> tuple[Any, Any]:
        """``fn()`` captured into the pool (not run): ``(graph, output)``, or ``(None, None)`` with capturing off. With
        :attr:`KEEP` graphs held, all are dropped first (one at a time would release the lane's workspace under the
        others: :func:`capture_stream`); the keys that come back are captured again."""
        if len(self.graphs) >= self.KEEP:
            self.graphs.clear()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, out, err = capture_call(fn, self.pool, self.WHAT, lane=self.lane)
        if err is not None:
            self.capture_error, self.use_graphs = err, False
        return graph, out

    def _admit(self, key: tuple, entry: tuple, replayed: torch.Tensor, eager: torch.Tensor) -> bool:
        """Keep a new graph (``entry``) under ``key`` if its first replay agrees with the eager output (one host
        sync); else turn capturing off, with a warning, and keep nothing."""
        why = replay_mismatch(replayed, eager, self.TOLERANCE)
        if why is not None:  # graphs off: none of them replays any more
            self.capture_error, self.use_graphs = why, False
            self.graphs.clear()
            warnings.warn(f"{self.WHAT}: {why}; running eagerly", stacklevel=3)
            return False
        self.graphs[key] = entry
        self.captures += 1
        self.weights = weight_addresses(self.module)
        return True


@dataclass
class _State:
    """Everything one captured decode step reads and writes: fixed addresses, reused across calls."""

    cache: Any
    mask: torch.Tensor  # [B, 1, 1, L] bool (sdpa) or additive float (eager): which cache slots a query sees
    tok: torch.Tensor  # [B, 1] the token fed at this step
    pos: torch.Tensor  # [3, B, 1] its mrope position
    cur: torch.Tensor  # [1] its cache slot
    step: torch.Tensor  # [] the index of the token being sampled (the noise counter)
    width: torch.Tensor  # [1] the prompt width of the current call (where sampled tokens start in ``hist``)
    seeds: torch.Tensor  # [B]
    hist: torch.Tensor  # [B, L] prompt + sampled tokens (repetition penalty); unwritten slots repeat a prompt token
    out_tok: torch.Tensor  # [B, max_new]
    out_lp: torch.Tensor  # [B, max_new] raw log-probs
    done: torch.Tensor  # [B] an eos was sampled
    graph: Any = None
    weights: tuple = ()  # parameter addresses the graph was captured with
    eager_steps: int = 0
    extra: dict = field(default_factory=dict)


class StaticDecoder:
    """Prefill + decode over a static KV cache for one model; keeps a few captured decode graphs (LRU)."""

    CHECK_EVERY = 16  # decode steps between host checks (all rows done? stop strings?)
    WARMUP_STEPS = 2  # eager steps (side stream) before a graph is captured
    MAX_STATES = 4

    def __init__(self, model: torch.nn.Module, use_graphs: bool | None = None):
        self.model = model
        self.use_graphs = use_graphs
        self.states: OrderedDict[tuple, _State] = OrderedDict()
        self.lane = new_lane("static")  # the capture stream of its graphs (capture_stream)
        self.additive_mask = _attn_implementation(model) == "eager"
        self.backend: str | None = None  # the decode steps' sdpa backend (decode_attention); None: torch's choice
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.capture_error: str | None = None

    # -- the pieces of one step -----------------------------------------------------------------------------
    def _allow(self, st: _State, slot: torch.Tensor) -> None:
        if self.additive_mask:
            st.mask.index_fill_(3, slot, 0.0)
        else:
            st.mask.index_fill_(3, slot, True)

    def _sample_record(self, st: _State, logits: torch.Tensor, params: Any) -> None:
        from vigorl_cli.engines.hf import sample_next

        chosen, lp = sample_next(logits.float(), st.hist, params, st.seeds, st.extra.get("suppress"), st.step)
        idx = st.step.view(1)
        st.out_tok.index_copy_(1, idx, chosen[:, None])
        st.out_lp.index_copy_(1, idx, lp[:, None])
        if params.repetition_penalty != 1.0:
            st.hist.index_copy_(1, idx + st.width, chosen[:, None])  # a tensor: graphs serve every width
        st.done |= (chosen[:, None] == st.extra["eos"][None, :]).any(-1)
        st.tok.copy_(chosen[:, None])

    def _decode_step(self, st: _State, params: Any) -> None:
        """Feed ``st.tok`` at slot ``st.cur``, sample the next token. Capture-safe: no host sync, fixed shapes."""
        self._allow(st, st.cur)
        out = self.model(input_ids=st.tok, attention_mask=st.mask, position_ids=st.pos, past_key_values=st.cache,
                         use_cache=True, logits_to_keep=1)
        st.step.add_(1)
        self._sample_record(st, out.logits[:, -1], params)
        st.pos.add_(1)
        st.cur.add_(1)

    # -- state ------------------------------------------------------------------------------------------------
    def _state(self, batch: int, cache_len: int, max_new: int, params: Any, device: torch.device,
               dtype: torch.dtype, eos_ids: tuple[int, ...], suppress_ids: tuple[int, ...]) -> _State:
        from transformers import StaticCache

        key = (batch, cache_len, max_new, params.temperature > 0, params.top_p, params.top_k,
               params.repetition_penalty, str(device), dtype, eos_ids, suppress_ids, self.backend)
        st = self.states.get(key)
        if st is not None:
            self.states.move_to_end(key)
            return st
        if len(self.states) >= self.MAX_STATES:  # the least recently used goes, and with it every graph (they
            self._drop_graphs()                    # share one lane: capture_stream)
            while len(self.states) >= self.MAX_STATES:
                self.states.popitem(last=False)
        mask_dtype = dtype if self.additive_mask else torch.bool
        lng = dict(dtype=torch.long, device=device)
        st = _State(
            cache=StaticCache(config=self.model.config, max_cache_len=cache_len),
            mask=torch.zeros((batch, 1, 1, cache_len), dtype=mask_dtype, device=device),
            tok=torch.zeros((batch, 1), **lng), pos=torch.zeros((3, batch, 1), **lng),
            cur=torch.zeros(1, **lng), step=torch.zeros((), **lng), width=torch.zeros(1, **lng),
            seeds=torch.zeros(batch, **lng),
            hist=torch.zeros((batch, cache_len), **lng), out_tok=torch.zeros((batch, max_new), **lng),
            out_lp=torch.zeros((batch, max_new), dtype=torch.float32, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device))
        st.extra["eos"] = torch.tensor(list(eos_ids) or [-1], **lng)
        st.extra["suppress"] = torch.tensor(list(suppress_ids), **lng) if suppress_ids else None
        self.states[key] = st
        return st

    # -- public -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: dict[str, Any], params: Any, seeds: list[int], cache_len: int,
                 eos_ids: list[int], suppress_ids: list[int], stop_hit: Any = None,
                 autocast_dtype: torch.dtype | None = None, limits: list[int] | None = None,
                 expand: list[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Sample ``params.max_new_tokens`` tokens (fewer when every row finished) for left-padded ``inputs``.

        ``inputs``: input_ids / attention_mask ``[B, W]``, mm_token_type_ids, optionally pixel_values and
        image_grid_thw. ``eos_ids`` end a row; ``suppress_ids`` are never sampled. ``stop_hit(row, tokens) -> bool``:
        whether a row's tokens so far hold a stop string (checked every :attr:`CHECK_EVERY` steps). ``limits``: per
        row, its own token limit (a row past it counts as finished; the caller cuts it). ``expand``: the rows to
        sample, as indices into the rows of ``inputs`` (distinct prompts, each prefilled once: its keys and values
        are written to every row that shows it); ``seeds`` and ``limits`` are then per sampled row. Returns per
        sampled row the sampled tokens and their raw log-probs (untruncated)."""
        input_ids, attn = inputs["input_ids"], inputs["attention_mask"]
        device = input_ids.device
        U, W = input_ids.shape
        B = len(expand) if expand is not None else U
        max_new = int(params.max_new_tokens)
        if W + max_new > cache_len:
            raise ValueError(f"cache length {cache_len} < prompt width {W} + {max_new} new tokens")
        dtype = next(self.model.parameters()).dtype if autocast_dtype is None else autocast_dtype
        st = self._state(B, cache_len, max_new, params, device, dtype, tuple(eos_ids), tuple(suppress_ids))
        if st.graph is not None and st.weights != weight_addresses(self.model):  # parameters moved: capture again
            self._drop_graphs()  # every state's (captured with the old ones too), before any is captured again
        graphs = device.type == "cuda" and self.use_graphs is not False
        autocast = (torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False)
                    if autocast_dtype is not None else contextlib.nullcontext())

        # prefill: the prompt into slots [0, W), the first token sampled from its last position
        pos = prompt_positions(self.model, input_ids, attn, inputs["mm_token_type_ids"],
                               inputs.get("image_grid_thw"))  # [3, U, W]
        valid = attn.bool()
        pre = torch.zeros((U, 1, W, cache_len), dtype=torch.bool, device=device)
        pre[:, 0, :, :W] = prompt_mask(valid)
        st.cache.reset()
        cache = st.cache if expand is None else _Expanded(st.cache, expand, device)
        rows = None if expand is None else cache.rows
        seen = input_ids if rows is None else input_ids[rows]  # one row per sample from here on
        st.seeds.copy_(torch.tensor([int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in seeds], dtype=torch.long))
        st.hist.copy_(seen[:, -1:].expand(B, cache_len))
        st.hist[:, :W] = seen
        st.done.zero_()
        st.step.fill_(0)
        st.width.fill_(W)
        st.out_tok.zero_()
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        from vigorl_cli.models.vision_attention import fused_attention

        with autocast, fused_attention(device):  # prompt widths vary: no per-shape cuDNN planning
            out = self.model(input_ids=input_ids, attention_mask=self._as_mask(pre, dtype), position_ids=pos,
                             past_key_values=cache,
                             use_cache=True, logits_to_keep=1, mm_token_type_ids=inputs["mm_token_type_ids"],
                             **extra)
            logits = out.logits[:, -1]
            self._sample_record(st, logits if rows is None else logits[rows], params)
        del out, logits
        if rows is not None:
            valid, pos = valid[rows], pos[:, rows]
        # decode state: the first token goes to slot W at position max(prompt position) + 1
        st.mask.copy_(self._as_mask(torch.zeros_like(st.mask, dtype=torch.bool), dtype))
        st.mask[:, 0, 0, :W] = self._as_mask(valid, dtype)
        st.pos.copy_(pos.amax(dim=2, keepdim=True).amax(dim=0, keepdim=True).expand(3, B, 1) + 1)
        st.cur.fill_(W)

        with decode_attention(self.model, self.backend):
            n = self._decode(st, params, max_new, stop_hit, graphs, autocast, device, limits)
        toks = st.out_tok[:, :n].tolist()
        lps = st.out_lp[:, :n].tolist()
        return toks, lps

    def _decode(self, st: _State, params: Any, max_new: int, stop_hit: Any, graphs: bool, autocast: Any,
                device: torch.device, limits: list[int] | None = None) -> int:
        """Decode steps 1 .. max_new - 1 (fewer when every row finished); returns the number of tokens sampled."""
        n = 1
        while n < max_new:
            if n % self.CHECK_EVERY == 0 and self._finished(st, n, stop_hit, limits):
                break
            if graphs and st.graph is not None:
                st.graph.replay()
            elif graphs and st.eager_steps >= self.WARMUP_STEPS and max_new - n > 1:
                graphs = self._capture(st, params, autocast)
                continue  # capturing does not run the step: replay it (or run it eagerly) on the next turn
            elif graphs:
                side = capture_stream(self.lane)  # warm up where the step is captured
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side), autocast:
                    self._decode_step(st, params)
                torch.cuda.current_stream(device).wait_stream(side)
                st.eager_steps += 1
            else:
                with autocast:
                    self._decode_step(st, params)
            n += 1
        return n

    def _as_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.additive_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def _drop_graphs(self) -> None:
        for s in self.states.values():
            s.graph, s.eager_steps = None, 0

    def _capture(self, st: _State, params: Any, autocast: Any) -> bool:
        st.graph, err = capture_step(lambda: self._decode_step(st, params), autocast, self.lane)
        if st.graph is None:
            self.capture_error, self.use_graphs = err, False
            return False
        st.weights = weight_addresses(self.model)
        self.captures += 1
        return True

    def _finished(self, st: _State, n: int, stop_hit: Any, limits: list[int] | None = None) -> bool:
        """Every row has sampled an eos, completed a stop string or reached its limit (one host sync per check)."""
        done = st.done.tolist()
        if limits is not None:
            done = [d or n >= lim for d, lim in zip(done, limits)]
        if stop_hit is not None and not all(done):
            toks = st.out_tok[:, :n].tolist()
            for r, d in enumerate(done):
                if not d and stop_hit(r, toks[r]):
                    done[r] = True
        return all(done)
