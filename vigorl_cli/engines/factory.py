"""Build the engine a recipe asks for (one place, so mcts, grpo and eval agree)."""

from __future__ import annotations

from typing import Any

from vigorl_cli.errors import EngineError


def hf_engine(bundle: Any, engine_cfg: Any, seed: int = 0, cache_len: int | None = None, **kw: Any):
    """The HF engine of a recipe: :class:`~vigorl_cli.engines.hf_stream.HFStreamingEngine` with
    ``engine.continuous_batching`` (cache length ``engine.max_model_len``, else ``cache_len``, else 8192), else
    :class:`~vigorl_cli.engines.hf.HFEngine` (``engine.static_cache``). ``kw`` goes to the engine."""
    if getattr(engine_cfg, "continuous_batching", False):
        from vigorl_cli.engines.hf_stream import HFStreamingEngine

        eng = HFStreamingEngine(bundle, batch_size=engine_cfg.batch_size, seed=seed,
                                cache_len=engine_cfg.max_model_len or cache_len or 8192, **kw)
        # scheduling settings the recipe names (None keeps the engine's default)
        for key, attr in (("prefill_overlap", "overlap"), ("prefill_min", "prefill_min"),
                          ("prefill_wait", "PREFILL_WAIT"), ("prefill_cover", "PREFILL_COVER"),
                          ("prefill_graphs", "prefill_graphs"), ("prefill_eager", "prefill_eager"),
                          ("vision_graphs", "vision_graphs"), ("vision_ahead", "vision_ahead"),
                          ("prepare_threads", "prepare_threads"),
                          ("launch_before_collect", "launch_before_collect")):
            value = getattr(engine_cfg, key, None)
            if value is not None:  # ranges: recipe.check_semantics
                setattr(eng, attr, bool(value) if isinstance(getattr(eng, attr), bool) else int(value))
    else:
        from vigorl_cli.engines.hf import HFEngine

        eng = HFEngine(bundle, batch_size=engine_cfg.batch_size, seed=seed, static_cache=engine_cfg.static_cache,
                       **kw)
    eng.share_prompts = bool(getattr(engine_cfg, "share_prompts", False))
    backend = getattr(engine_cfg, "decode_backend", "auto")
    eng.decode_backend = None if backend in (None, "auto") else str(backend)
    return eng


def make_engine(backend: str, model: str, engine_cfg: Any, model_cfg: Any, seed: int = 0, bundle: Any = None):
    """Returns ``(engine, processor)``. ``bundle``: an already loaded ModelBundle to reuse (hf backend)."""
    from vigorl_cli.models.load import load_model, load_processor, model_kind, resolve_model

    if backend == "hf":
        b = bundle or load_model(model, dtype=model_cfg.dtype, attn_implementation=model_cfg.attn_implementation,
                                 min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                                 revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                                 vision_attention=model_cfg.vision_attention)
        return hf_engine(b, engine_cfg, seed=seed), b.processor
    path = resolve_model(model)
    from transformers import AutoConfig

    kind = model_kind(AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code))
    processor = load_processor(path, kind, min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                               revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    if backend == "vllm":
        from vigorl_cli.engines.vllm import VLLMEngine

        eng = VLLMEngine(str(path), dtype=model_cfg.dtype, gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                         tensor_parallel_size=engine_cfg.tensor_parallel_size, max_model_len=engine_cfg.max_model_len,
                         enforce_eager=engine_cfg.enforce_eager, seed=seed, min_pixels=model_cfg.min_pixels,
                         max_pixels=model_cfg.max_pixels, no_barrier=engine_cfg.no_barrier)
        return eng, processor
    if backend == "openai":
        from vigorl_cli.engines.openai import OpenAIEngine

        if not engine_cfg.base_urls:
            raise EngineError("the openai engine needs at least one base URL",
                              hint="--base-url http://host:port/v1 (repeatable) or engine.base_urls in the recipe")
        eng = OpenAIEngine(list(engine_cfg.base_urls), engine_cfg.served_model or str(model),
                           api_key=engine_cfg.api_key, concurrency=engine_cfg.concurrency,
                           timeout_s=engine_cfg.timeout_s, max_retries=engine_cfg.max_retries)
        return eng, processor
    raise EngineError(f"unknown engine backend {backend!r}; choose hf, vllm or openai")
