"""HF engine: batched ``generate`` on a transformers model, on any machine.

Design points (environment.md §2.2 pitfalls are handled here):

* **Per-request seeds, independent of batching.** HF ``generate`` samples every row from one global RNG, so the
  same request would sample differently depending on what else is in its batch. We run ``generate`` greedily and
  do the sampling ourselves in a logits processor (:class:`SeededSampler`) with the Gumbel-max trick and a
  counter-based noise stream per row (:func:`gumbel_noise`: a hash of (seed, step, token id)). A request then
  gives the same tokens alone or in any batch (up to floating-point differences of padded batched attention,
  which can flip a near-tie), and sampling is one vectorised op per step on the GPU.
* **Raw log-probs.** The sampler sees the raw logits (no HF processor runs before it: the generation config is
  built fresh, so a checkpoint's own ``suppress_tokens``/``top_k``/temperature never leak in) and records
  ``log_softmax(raw)[token]``: the policy's log-prob at temperature 1, what the trainer recomputes.
* **Vision tokens are never sampled** (their logits are set to -inf before sampling), so a sampled sequence can
  always be fed back through the model.
* Prompts arrive with one ``<|image_pad|>`` per image; they are expanded here by each image's grid, and
  ``mm_token_type_ids`` is passed (Qwen2.5-VL silently falls back to 1-D RoPE without it).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor

from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, derive_seed, sample_seeds
from vigorl_cli.models.load import (
    SHARED_IMAGE_KINDS,
    ModelBundle,
    distinct_images,
    mm_token_type_ids,
    shared_image_features,
    vision_special_ids,
)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_M1, _M2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiply; logical shifts via masks)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, V]`` Gumbel(0, 1) noise that depends only on (row seed, step, token id): a counter-based RNG.

    Sampling ``argmax(logits / T + noise)`` draws from ``softmax(logits / T)`` (the Gumbel-max trick), and because
    the noise of a row never depends on the other rows, a request samples the same tokens alone or in any batch,
    with no per-row generator calls (fully vectorised, on the logits' device).
    """
    base = _mix64(seeds * _GOLDEN + step)  # [B]
    x = _mix64(base[:, None] + torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :] * _GOLDEN)
    u = (((x >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) / float(1 << 53)  # (0, 1)
    return -torch.log(-torch.log(u))


class SeededSampler(LogitsProcessor):
    """Samples each row from its own seeded stream; returns scores that make greedy selection pick that sample."""

    def __init__(self, params: SamplingParams, seeds: list[int], suppress_ids: list[int],
                 device: torch.device | str = "cpu"):
        self.p = params
        self.seeds = torch.tensor([int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in seeds], dtype=torch.int64, device=device)
        self.suppress = torch.tensor(suppress_ids, dtype=torch.long, device=device) if suppress_ids else None
        self._steps: list[torch.Tensor] = []

    @property
    def logprobs(self) -> list[list[float]]:
        """Per row, the raw log-prob of every sampled token (one host sync, at the end)."""
        if not self._steps:
            return [[] for _ in range(self.seeds.shape[0])]
        return torch.stack(self._steps, dim=1).float().cpu().tolist()  # [B, steps]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen, logp = sample_next(scores.float(), input_ids, self.p, self.seeds, self.suppress, len(self._steps))
        self._steps.append(logp)  # [B], kept on device until the end
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def sample_next(raw: torch.Tensor, seen_ids: torch.Tensor, p: SamplingParams, seeds: torch.Tensor,
                suppress: torch.Tensor | None, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step, shared by ``generate``'s logits processor and the static decode loop's CUDA graph.

    ``raw``: ``[B, V]`` fp32 logits; ``seen_ids``: ``[B, *]`` tokens the repetition penalty looks at; ``step``: the
    index of the token being sampled (an int, or a 0-d tensor inside a captured graph). Returns the chosen tokens
    ``[B]`` and their raw log-probs ``[B]`` (temperature 1, before suppression and penalties). No host sync."""
    logp_raw = torch.log_softmax(raw, dim=-1)  # [B, V] policy log-probs at T=1
    x = raw.clone()
    if suppress is not None:
        x.index_fill_(1, suppress, float("-inf"))  # a scalar fill: no host tensor (CUDA-graph capture)
    if p.repetition_penalty != 1.0:
        seen = torch.gather(x, 1, seen_ids)
        seen = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        x = x.scatter(1, seen_ids, seen)
    if p.temperature <= 0:
        chosen = x.argmax(dim=-1)  # [B]
    else:
        x = x / p.temperature
        if p.top_k and p.top_k > 0:
            kth = torch.topk(x, min(p.top_k, x.shape[-1]), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = (probs.cumsum(dim=-1) - probs) >= p.top_p  # keep the smallest prefix reaching top_p
            x = x.scatter(1, idx, sorted_x.masked_fill(drop, float("-inf")))
        chosen = (x.double() + gumbel_noise(seeds, step, x.shape[-1])).argmax(dim=-1)  # [B]
    return chosen, logp_raw.gather(1, chosen[:, None]).squeeze(1)


def _all_reduce_max(n: int) -> int:
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


class HFEngine:
    """Batched sampling with ``model.generate``. Requests with equal sampling settings share a batch."""

    name = "hf"
    CACHE_BUCKET = 256  # static cache lengths are multiples of this (attention reads every slot of the cache)
    WIDTH_BUCKET = 64  # static cache: prompts are left-padded to a multiple of this

    def __init__(self, bundle: ModelBundle, batch_size: int = 16, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None, synced_gpus: bool = False,
                 generate_fn: Callable[..., torch.Tensor] | None = None, static_cache: bool = False):
        """``autocast_dtype``: run generation under ``torch.autocast`` (GRPO on a GPU keeps fp32 master weights and
        trains under bf16 autocast; sampling under the same autocast keeps engine and trainer log-probs equal).

        ``synced_gpus``: the model is sharded over the ranks of a process group (FSDP2, ZeRO-3), so every forward is
        collective. Each :meth:`generate` call is then collective too: every rank must call it the same number of
        times (with any number of requests, none included); ranks agree on the number of batched ``generate`` runs
        (a rank with fewer runs a one-token dummy request for the rest), and HF ``generate(synced_gpus=True)`` keeps
        the ranks in lockstep within a run. Every request must carry an image (the vision tower's forward is
        collective as well). ``generate_fn``: called instead of ``model.generate`` with the same keyword arguments
        (e.g. through the FSDP root's forward, so that the root's parameters are gathered around it).

        ``static_cache``: decode over a static KV cache. For the Qwen-VL families (sdpa or eager attention) this is
        our own loop (:mod:`vigorl_cli.engines.static_decode`): on CUDA each decode step — forward, sampling,
        bookkeeping — is one captured CUDA graph, and the host checks for finished rows every few steps; on CPU the
        same step runs eagerly (same tokens and log-probs as the dynamic cache). Other models use transformers'
        static-cache ``generate`` (which compiles the forward on CUDA). Prompts are left-padded to a multiple of
        :attr:`WIDTH_BUCKET` tokens and the cache length is rounded up to a multiple of :attr:`CACHE_BUCKET`, so
        calls of one batch size reuse the captured graphs."""
        self.autocast_dtype = autocast_dtype
        self.synced_gpus = bool(synced_gpus)
        self.static_cache = bool(static_cache) and not synced_gpus
        self.dedupe_images = True
        # identical prompts in one prefill are fed once, their keys and values copied (static decode loop and
        # continuous batching; the dynamic-cache generate path feeds every row). Off by default: on an H200 the
        # turn-synchronous multi-turn loop did not get faster with it (209.1 s against 208.9 / 209.4 s, 485k prompt
        # tokens not fed) and the no-barrier loop's one run with it was slower (docs/performance.md, issue 7)
        self.share_prompts = False
        self.shared_tokens = 0  # prompt tokens not fed because another row of the prefill had the same prompt
        self.generate_fn = generate_fn
        self.bundle = bundle
        self.model = bundle.model
        self.processor = bundle.processor
        self.tok = bundle.processor.tokenizer
        self.batch_size = max(1, batch_size)
        self.seed = seed
        cfg = self.model.config
        self.image_token_id = cfg.image_token_id
        self.merge = int(getattr(self.processor.image_processor, "merge_size", 2))
        self.suppress = vision_special_ids(self.tok)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end not in eos:
            eos.append(im_end)
        self.eos_ids = eos
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos[0]
        from vigorl_cli.engines import static_decode

        ours = self.static_cache and generate_fn is None and static_decode.supports(self.model, bundle.kind)
        self._decoder = static_decode.StaticDecoder(self.model) if ours else None
        # the decode steps' sdpa backend (static decode loop, continuous batching): None lets torch choose
        # (docs/performance.md: cuDNN's masked kernel took ~2 ms of an 8 ms step at 32 slots on an H200)
        self.decode_backend: str | None = None
        self._calls = 0
        self._features: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # key → (feats, grid)
        self._feature_state: tuple = ()
        self._pixel_dim = 0

    # -- public -----------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        rows: list[tuple[int, int, int]] = []  # (request index, sample index, seed)
        for ri, r in enumerate(requests):
            base = r.params.seed if r.params.seed is not None else derive_seed(self.seed, self._calls, ri)
            rows.extend((ri, k, s) for k, s in enumerate(sample_seeds(base, r.params.n)))
        self._calls += 1
        groups: dict[tuple, list[tuple[int, int, int]]] = defaultdict(list)
        for row in rows:
            groups[requests[row[0]].params.group_key()].append(row)
        out: list[list[Completion | None]] = [[None] * r.params.n for r in requests]
        chunks = [grp[i:i + self.batch_size] for grp in groups.values() for i in range(0, len(grp), self.batch_size)]
        n_runs = len(chunks)
        if self.synced_gpus:
            if any(not r.images for r in requests):
                raise ValueError("synced_gpus generation needs an image in every request (collective vision tower)")
            n_runs = _all_reduce_max(len(chunks))
        for chunk in chunks:
            for (ri, k, _), comp in zip(chunk, self._run(requests, chunk)):
                out[ri][k] = comp
        for _ in range(n_runs - len(chunks)):  # synced: this rank has fewer batches than another
            self._run([self._dummy_request()], [(0, 0, 0)])
        return [[c for c in lst if c is not None] for lst in out]

    @staticmethod
    def _image_keys(req: GenerationRequest) -> list:
        """The identity of each of the request's images: its ``image_keys`` entry, else the image object itself."""
        return [req.image_keys[j] if req.image_keys and j < len(req.image_keys) else ("id", id(img))
                for j, img in enumerate(req.images)]

    def _dummy_request(self) -> GenerationRequest:
        """One blank image, one token: what a synced rank without work of its own runs alongside the others."""
        from PIL import Image

        ip = self.processor.image_processor
        side = int(getattr(ip, "patch_size", 14)) * self.merge * 2
        ids = [self.tok.convert_tokens_to_ids("<|vision_start|>"), self.image_token_id,
               self.tok.convert_tokens_to_ids("<|vision_end|>")]
        return GenerationRequest(ids, [Image.new("RGB", (side, side), (255, 255, 255))],
                                 SamplingParams(temperature=0.0, max_new_tokens=1))

    def close(self) -> None:
        pass

    # -- internals ----------------------------------------------------------------------------------------------
    def encode_images(self, images: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not images:
            return None, None
        feats = self.processor.image_processor(images=images, return_tensors="pt")
        self._pixel_dim = int(feats["pixel_values"].shape[-1])
        return feats["pixel_values"], feats["image_grid_thw"]

    # -- image-feature cache --------------------------------------------------------------------------------------
    FEATURE_CACHE = 256  # distinct images whose vision features are kept (a 672² crop of the 3B shape: 2.4 MB)

    def _vision_state(self) -> tuple:
        """Changes when the vision tower's weights change (in place: autograd version counters; or new storage)."""
        from vigorl_cli.engines.static_decode import weight_addresses, weight_version

        visual = getattr(getattr(self.model, "model", None), "visual", None)
        return (weight_version(visual), weight_addresses(visual)) if visual is not None else ()

    def _cached_features(self, keys: list[Any]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{distinct image index: (features, grid row)}`` for the string keys cached under the current weights."""
        if self.synced_gpus:  # every rank must run the (collective) vision tower
            return {}
        self._drop_stale_features()
        out = {}
        for u, k in enumerate(keys):
            if isinstance(k, str) and k in self._features:
                self._features.move_to_end(k)
                out[u] = self._features[k]
        return out

    def reset_caches(self) -> None:
        """Forget every cached image feature, as :meth:`VLLMEngine.reset_caches` drops vLLM's caches: the next
        requests start cold (benchmarks: every run alike)."""
        self._features.clear()

    def _drop_stale_features(self) -> None:
        """Empty the feature cache if the vision tower's weights changed since its features were computed."""
        state = self._vision_state()
        if state != self._feature_state:
            self._features.clear()
            self._feature_state = state

    def _remember_features(self, key: Any, feats: torch.Tensor, grid_row: torch.Tensor) -> None:
        if self.synced_gpus or not isinstance(key, str):  # identity keys are not stable across calls
            return
        self._features[key] = (feats.detach(), grid_row.clone())
        while len(self._features) > self.FEATURE_CACHE:
            self._features.popitem(last=False)

    def _sharing(self, ukeys: list[Any], grid_u: torch.Tensor, occ: list[int],
                 known: dict[int, tuple[torch.Tensor, torch.Tensor]], check: bool = True, tower_graphs: Any = None):
        """The context of a forward that sees each distinct image once (``grid_u``, one row per distinct image;
        ``occ``: occurrence → distinct image), takes the ``known`` ones from the feature cache and remembers the
        others (models/load.py ``shared_image_features``)."""
        def remember(u: int, feats: torch.Tensor) -> None:
            self._remember_features(ukeys[u], feats, grid_u[u])

        return shared_image_features(self.model, grid_u, occ, known={u: f for u, (f, _) in known.items()},
                                     on_encoded=remember, check=check, tower_graphs=tower_graphs)

    def expand(self, prompt_ids: list[int], grid: torch.Tensor | None) -> list[int]:
        """One placeholder per image → as many as the image has merged patches."""
        if grid is None:
            if self.image_token_id in prompt_ids:
                raise ValueError("prompt holds image placeholders but the request has no images")
            return list(prompt_ids)
        counts = (grid.prod(dim=-1) // (self.merge ** 2)).tolist()
        out, k = [], 0
        for t in prompt_ids:
            if t == self.image_token_id:
                if k >= len(counts):
                    raise ValueError(f"prompt has more image placeholders than images ({len(counts)})")
                out.extend([t] * counts[k])
                k += 1
            else:
                out.append(t)
        if k != len(counts):
            raise ValueError(f"prompt has {k} image placeholders for {len(counts)} images")
        return out

    @torch.no_grad()
    def _run(self, requests: list[GenerationRequest], chunk: list[tuple[int, int, int]]) -> list[Completion]:
        device = self.model.device
        limits = [int(requests[ri].params.max_new_tokens) for ri, _, _ in chunk]  # each row's own limit
        params = requests[chunk[0][0]].params.with_(max_new_tokens=max(limits))
        # Every distinct image is processed and encoded once per call, however many rows show it (a GRPO group, the
        # n samples of a request, MCTS nodes of one tree): rows name their images by key (request.image_keys, else
        # the object's identity); the vision tower sees only the distinct ones (models/load.py shared_image_features).
        images: list[Any] = []  # every occurrence, in row order
        keys: list[Any] = []
        row_occ: list[list[int]] = []  # per row: its occurrences
        # Rows with the same prompt (tokens and image keys: a GRPO group's first turns, a request's n samples) are
        # prefilled once by our decode loop, which copies that row's keys and values to the others (``expand``).
        feed, expand = chunk, None
        if self._decoder is not None and self.share_prompts and len(chunk) > 1:
            first_row, expand = distinct_images([(tuple(requests[ri].prompt_ids),
                                                  tuple(self._image_keys(requests[ri]))) for ri, _, _ in chunk])
            feed = [chunk[i] for i in first_row]
            if len(feed) == len(chunk):
                expand = None
        for ri, _, _ in feed:
            req = requests[ri]
            row_occ.append(list(range(len(images), len(images) + len(req.images))))
            images += list(req.images)
            keys += self._image_keys(req)
        first, occ = distinct_images(keys)  # occ: occurrence → index into the distinct images
        uniq = [images[i] for i in first]
        share = bool(self.dedupe_images and uniq and self.bundle.kind in SHARED_IMAGE_KINDS)
        # images named by a string key whose features an earlier call computed (same vision weights) are not
        # processed or encoded again (a multi-turn episode's earlier images, an MCTS tree's image)
        ukeys = [keys[i] for i in first]
        known = self._cached_features(ukeys) if share else {}
        todo = [u for u in range(len(uniq)) if u not in known]
        pv_u, grid_todo = self.encode_images([uniq[u] for u in todo])  # pixels of the images still to encode
        grid_u = None
        if uniq:
            rows, fresh = [], iter(grid_todo if grid_todo is not None else [])
            for u in range(len(uniq)):
                rows.append(known[u][1] if u in known else next(fresh))
            grid_u = torch.stack(rows)
        grid_occ = grid_u[torch.tensor(occ, dtype=torch.long)] if uniq else None  # [n_occurrences, 3]
        ids_rows = []
        for (ri, _, _), mine in zip(feed, row_occ):
            ids_rows.append(self.expand(requests[ri].prompt_ids, grid_occ[mine] if mine else None))
        if uniq and not share:  # every occurrence encoded (models whose image features we do not re-use)
            sizes = grid_u.prod(-1).tolist()
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + n)
            pix = [torch.cat([pv_u[starts[u]:starts[u + 1]] for u in occ])]
        elif uniq:
            pix = [pv_u if pv_u is not None else torch.zeros((0, self._pixel_dim), dtype=torch.float32)]
        else:
            pix = []
        grids = [grid_occ] if uniq else []
        if expand is not None:
            self.shared_tokens += sum(len(ids_rows[u]) for u in expand) - sum(len(r) for r in ids_rows)
        width = max(len(r) for r in ids_rows)
        if self.static_cache:  # a bounded set of prompt widths: fewer shapes for the compiled decode step
            width = -(-width // self.WIDTH_BUCKET) * self.WIDTH_BUCKET
        input_ids = torch.full((len(ids_rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for i, r in enumerate(ids_rows):  # left padding: the last prompt token of every row is aligned
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attn.to(device),
                                  "mm_token_type_ids": mm_token_type_ids(input_ids, self.model.config).to(device)}
        if pix:
            inputs["pixel_values"] = torch.cat(pix).to(device, dtype=self.model.dtype)
            inputs["image_grid_thw"] = torch.cat(grids).to(device)
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        shared = self._sharing(ukeys, grid_u, occ, known) if pix and share else contextlib.nullcontext()
        # static cache: bucketed lengths, so later calls of the batch size reuse the captured / compiled graphs
        cache_len = -(-(width + params.max_new_tokens) // self.CACHE_BUCKET) * self.CACHE_BUCKET
        if self._decoder is not None:  # engine.static_cache: our decode loop, one CUDA graph per step
            self._decoder.backend = self.decode_backend
            checked = [0] * len(chunk)

            def stop_hit(row: int, tokens: list[int]) -> bool:
                start, checked[row] = max(0, checked[row] - 1), len(tokens)
                return self._cut(tokens, params, start) is not None

            with shared:
                toks, lps = self._decoder.generate(
                    inputs, params, [s for _, _, s in chunk], cache_len, self.eos_ids, self.suppress,
                    stop_hit=stop_hit if params.stop else None,
                    autocast_dtype=self.autocast_dtype, limits=limits, expand=expand)
            return [self._finish(toks[i][:limits[i]], lps[i][:limits[i]], params) for i in range(len(chunk))]
        sampler = SeededSampler(params, [s for _, _, s in chunk], self.suppress, device=device)
        gc = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                              pad_token_id=self.pad_id, stop_strings=list(params.stop) or None)
        if self.static_cache:
            gc.cache_implementation = "static"
            gc.max_cache_len = cache_len
        # generate() fills unset fields from the checkpoint's generation config (suppress_tokens, top_k, ...):
        # swap in a clean one so that no processor runs before the sampler and log-probs stay raw.
        saved, self.model.generation_config = self.model.generation_config, GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        try:
            extra = {"synced_gpus": True} if self.synced_gpus else {}
            with autocast, shared:
                gen = (self.generate_fn or self.model.generate)(
                    **inputs, generation_config=gc, logits_processor=[sampler],
                    tokenizer=self.tok if params.stop else None, **extra)
        finally:
            self.model.generation_config = saved
        new = gen[:, width:].tolist()
        logprobs = sampler.logprobs
        return [self._finish(new[i][:limits[i]], logprobs[i][:limits[i]], params) for i in range(len(chunk))]

    def _cut(self, tokens: list[int], params: SamplingParams, start: int = 0) -> tuple[int, str] | None:
        """The index of the first token from ``start`` on that ends the completion (an eos token, or the token
        completing a stop string) and why, else None."""
        longest = max((len(s) for s in params.stop), default=0)
        for i in range(start, len(tokens)):
            if tokens[i] in self.eos_ids:
                return i, "eos"
            if params.stop:
                tail = self.tok.decode(tokens[max(0, i - longest - 1):i + 1], skip_special_tokens=False)
                hit = next((s for s in params.stop if s in tail), None)
                if hit is not None:
                    return i, hit
        return None

    def _finish(self, tokens: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
        """Cut a row at its first eos token or stop string (inclusive); what follows is padding."""
        cut = self._cut(tokens, params)
        if cut is not None:
            kept = tokens[:cut[0] + 1]
            return Completion(kept, self.tok.decode(kept, skip_special_tokens=False), logprobs[:cut[0] + 1],
                              "stop", cut[1])
        return Completion(tokens, self.tok.decode(tokens, skip_special_tokens=False), logprobs[:len(tokens)],
                          "length", None)
