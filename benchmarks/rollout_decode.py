"""Rollout generation: plain HF ``generate`` vs our HF engine, same model, prompts and token counts, one process.

The GPU-efficiency issue's "rollout generation" row (gpu-baseline.md: plain HF at B=32, 256 new tokens: 830 tok/s,
~33 ms per decode step, launch-bound). Ours adds per-request seeded sampling (Gumbel-max with a counter-based
noise stream), raw log-probs and vision-token suppression, and runs the vision tower with one attention call per
layer (models/vision_attention.py; the plain arm keeps HF's per-window loop); this measures what that costs or saves.

    python benchmarks/rollout_decode.py --batch 32 --new-tokens 256         # GPU, Qwen2.5-VL-3B shape
    python benchmarks/rollout_decode.py --tiny --batch 4 --new-tokens 16    # CPU smoke test

The ``vigorl_hf_engine_static_cache`` arm is the engine with ``engine.static_cache``: our decode loop over a static KV
cache with each decode step (forward + sampling) captured as one CUDA graph (engines/static_decode.py; its warm-up
call captures). ``plain_hf_generate_static`` is plain HF's own fast path for comparison: ``generate`` with
``cache_implementation="static"``, which compiles the forward (``reduce-overhead``; its warm-up call pays the compile).
``vigorl_hf_engine_static_cache_compiled`` adds ``model.compile``'s regional compile of norms and MLPs (the
captured graph then replays fused kernels; it stays compiled: run it last). ``agree_with_dynamic`` (static arm): the
fraction of rows whose tokens equal the dynamic-cache engine's (bf16 numerics
of two attention kernels can flip a near-tie, after which a row diverges).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-vl-3b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--arms", default="plain_hf_generate,vigorl_hf_engine,vigorl_hf_engine_no_image_dedupe,"
                                      "vigorl_hf_engine_static_cache",
                    help="which arms, in order (the static-cache arm's warm-up call compiles the decode step)")
    ap.add_argument("--profile", action="store_true",
                    help="also: a torch.profiler table of the static-cache engine decoding eagerly (the kernels its "
                         "CUDA graph replays), and whether graph and eager decoding give the same tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from vigorl_cli.engines.base import GenerationRequest, SamplingParams
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.models.load import load_model, mm_token_type_ids
    from vigorl_cli.models.vision_attention import set_vision_attention

    if args.tiny:
        bundle = load_model("tiny-qwen2.5-vl")
    else:
        from vigorl_cli.models.shapes import shaped_bundle

        bundle = shaped_bundle(args.shape, max_pixels=504 * 504)
    proc, tok, model = bundle.processor, bundle.tokenizer, bundle.model
    cuda = torch.cuda.is_available()
    img = Image.effect_noise((504, 504), 64).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image " * 20}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reqs = [GenerationRequest(ids, [img], SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=i))
            for i in range(args.batch)]
    eng = HFEngine(bundle, batch_size=args.batch)
    eng_static = HFEngine(bundle, batch_size=args.batch, static_cache=True)
    batch = proc(text=[text] * args.batch, images=[img] * args.batch, return_tensors="pt", padding=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "mm_token_type_ids" not in batch:
        batch["mm_token_type_ids"] = mm_token_type_ids(batch["input_ids"], model.config)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def plain():
        set_vision_attention(model, "hf")  # plain HF: its own per-window vision attention loop
        with torch.no_grad():
            return model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def ours():
        set_vision_attention(model, "auto")
        eng.dedupe_images = True
        return eng.generate(reqs)

    def ours_no_dedupe():
        set_vision_attention(model, "auto")
        eng.dedupe_images = False
        return eng.generate(reqs)

    def ours_static():
        set_vision_attention(model, "auto")
        return eng_static.generate(reqs)

    eng_compiled = None

    def ours_static_compiled():  # model.compile's regional compile (norms + MLPs), then the static decode loop
        nonlocal eng_compiled
        from vigorl_cli.models.compile import compile_blocks, is_compiled

        set_vision_attention(model, "auto")
        if not is_compiled(model):
            compile_blocks(model)
            eng_compiled = HFEngine(bundle, batch_size=args.batch, static_cache=True)
        return eng_compiled.generate(reqs)

    def plain_static():
        set_vision_attention(model, "hf")
        with torch.no_grad():
            return model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  cache_implementation="static")

    arms = {"plain_hf_generate": plain, "plain_hf_generate_static": plain_static, "vigorl_hf_engine": ours,
            "vigorl_hf_engine_no_image_dedupe": ours_no_dedupe,
            "vigorl_hf_engine_static_cache": ours_static,
            "vigorl_hf_engine_static_cache_compiled": ours_static_compiled}
    results = {}
    for name in [a.strip() for a in args.arms.split(",")]:
        fn = arms[name]
        fn()  # warm-up
        times = []
        for _ in range(args.reps):
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t)
        if name.startswith("vigorl_hf_engine"):
            n_tok = sum(len(c[0].token_ids) for c in out)
        else:
            n_tok = (out.shape[1] - batch["input_ids"].shape[1]) * args.batch
        best = min(times)
        results[name] = {"seconds": round(best, 3), "tokens": n_tok, "tok_per_s": round(n_tok / best, 1),
                         "ms_per_step": round(1000 * best / args.new_tokens, 2)}
        if name == "vigorl_hf_engine_static_cache":
            dyn = ours()
            results[name]["agree_with_dynamic"] = round(
                sum(a[0].token_ids == b[0].token_ids for a, b in zip(dyn, out)) / len(out), 3)
            results[name]["graphs_captured"] = eng_static._decoder.captures if eng_static._decoder else 0
            results[name]["capture_error"] = eng_static._decoder.capture_error if eng_static._decoder else None
            results[name]["first_token_agree"] = round(
                sum(a[0].token_ids[:1] == b[0].token_ids[:1] for a, b in zip(dyn, out)) / len(out), 3)
            if args.profile:
                eager = HFEngine(bundle, batch_size=args.batch, static_cache=True)
                eager._decoder.use_graphs = False
                results[name]["graph_equals_eager"] = round(
                    sum(a[0].token_ids == b[0].token_ids for a, b in zip(eager.generate(reqs), out)) / len(out), 3)
                from torch.profiler import ProfilerActivity, profile

                short = [GenerationRequest(r.prompt_ids, r.images, r.params.with_(max_new_tokens=33)) for r in reqs]
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else
                             [ProfilerActivity.CPU]) as prof:
                    eager.generate(short)
                    sync()
                key = "self_device_time_total" if cuda else "self_cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
        print(json.dumps({name: results[name]}), flush=True)
    final = {"benchmark": "rollout_decode", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
             "batch": args.batch, "new_tokens": args.new_tokens, "prompt_tokens": len(ids), "results": results,
             "ratios_over_plain": {k: round(v["tok_per_s"] / results["plain_hf_generate"]["tok_per_s"], 3)
                                   for k, v in results.items() if "plain_hf_generate" in results}}
    print(json.dumps(final), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
