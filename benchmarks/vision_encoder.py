"""Vision encoder: HF's per-window attention loop vs one attention call per layer, same tower, one process.

The GPU-efficiency issue's "vision encoder" row (gpu-baseline.md: plain HF, 8 images at 504², 256 ms on an H100
against a floor of about 18 ms; HF's sdpa path makes one attention call per window of every image, 200 per window
layer here, plus a host sync per layer). Builds only the vision tower of the named shape (random weights, HF init),
then times each attention mode on the same weights and inputs: ``hf`` (HF's own forward), ``batched`` (one padded
sdpa call per layer, vigorl's default) and, on a CUDA device with a varlen kernel, ``varlen`` (one flash varlen
call per layer). Best and median of ``--reps`` after ``--warmup`` calls; inputs rotate between two random sets.
Accuracy: every mode's output against HF's in the timed dtype, and against HF's in float32 (``--fp32-ref``).

    python benchmarks/vision_encoder.py                                   # GPU: Qwen2.5-VL-3B tower, 8 × 504², bf16
    python benchmarks/vision_encoder.py --tiny                            # CPU smoke test (seconds)
    python benchmarks/vision_encoder.py --images 2 --layers 4 --dtype float32 --reps 2   # CPU, real width, 4 layers
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_tower(shape: str, tiny: bool, layers: int | None, device: str):
    """The vision tower in float32 (cast per mode later) and its config."""
    import torch
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    if tiny:
        from vigorl_cli.models.tiny import build_tokenizer, make_config

        vc = make_config("qwen2_5_vl", build_tokenizer()).vision_config
    else:
        from vigorl_cli.models.shapes import SHAPES

        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        vc = transformers.Qwen2_5_VLVisionConfig(**SHAPES[shape]["vision"])
    if layers:
        # keep the first `layers` blocks; at least one full-attention block (the last) so both kinds are timed
        vc.fullatt_block_indexes = [i for i in vc.fullatt_block_indexes if i < layers] or [layers - 1]
        vc.depth = layers
    with torch.device(device):
        torch.manual_seed(0)
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc, dtype=torch.float32,
                                                                     attn_implementation="sdpa")
    return tower.eval(), vc


def flop_count(tower, vc, grids) -> float:
    """Matmul FLOPs of one forward: 2·params·tokens for blocks and patch embed, the merger on merged tokens, and
    4·hidden·Σlen² per layer for attention (real segment lengths, no padding)."""
    tokens = sum(t * h * w for t, h, w in grids)
    blocks = sum(p.numel() for p in tower.blocks.parameters())
    embed = sum(p.numel() for p in tower.patch_embed.parameters())
    merger = sum(p.numel() for p in tower.merger.parameters())
    fl = 2 * tokens * (blocks + embed) + 2 * tokens // vc.spatial_merge_size ** 2 * merger
    win = vc.window_size // vc.spatial_merge_size // vc.patch_size  # window side in merged units
    unit = vc.spatial_merge_size ** 2
    win_sq, full_sq = 0, 0
    for t, h, w in grids:
        full_sq += t * (h * w) ** 2
        mh, mw = h // vc.spatial_merge_size, w // vc.spatial_merge_size
        for i in range(0, mh, win):
            for j in range(0, mw, win):
                win_sq += t * (min(win, mh - i) * min(win, mw - j) * unit) ** 2
    n_full = len(vc.fullatt_block_indexes)
    fl += 4 * vc.hidden_size * (n_full * full_sq + (vc.depth - n_full) * win_sq)
    return float(fl)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-vl-3b")
    ap.add_argument("--tiny", action="store_true", help="the tiny model's tower (CPU smoke test)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=504, help="image side in pixels (a multiple of 28)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N vision blocks (CPU runs)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) or float32 (default on CPU)")
    ap.add_argument("--modes", default="hf,batched,varlen",
                    help="varlen is skipped where it cannot run; MODE+compile adds model.compile's regional compile "
                         "of norms and MLPs (it stays on: list such modes last); MODE+conv / MODE+unaligned keep "
                         "HF's Conv3d patch embedding / HF's unaligned MLP width (e.g. varlen+unaligned+compile)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fp32-ref", choices=("on", "off"), default="on",
                    help="also compare with HF's forward in float32 when timing a lower precision (a second tower)")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="matmul rate for the floor column (790: the H100 bf16 rate gpu-baseline.md used)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile the last mode's forward (torch.profiler) and print its top kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.images, args.reps, args.warmup = min(args.images, 2), min(args.reps, 3), 1
    if args.size % 28:
        raise SystemExit("--size must be a multiple of 28 (patch 14 × merge 2)")

    import torch

    from vigorl_cli.models.vision_attention import _varlen_kernel, set_vision_attention

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tower32, vc = build_tower(args.shape, args.tiny, args.layers, dev)
    ref_tower = None  # HF's forward in float32, for the accuracy column
    if dtype == torch.float32:
        tower = tower32
    elif args.fp32_ref == "on":
        tower, ref_tower = copy.deepcopy(tower32).to(dtype), tower32
    else:
        tower = tower32.to(dtype)
    g = args.size // vc.patch_size
    grids = [[1, g, g]] * args.images
    grid = torch.tensor(grids, device=dev)
    n = sum(t * h * w for t, h, w in grids)
    cin = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    gen = torch.Generator(device=dev).manual_seed(1)
    inputs = [torch.randn(n, cin, device=dev, generator=gen, dtype=torch.float32) for _ in range(2)]
    flops = flop_count(tower, vc, grids)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    modes = []
    for m in args.modes.split(","):
        if m.partition("+")[0] == "varlen" and (not cuda or dtype == torch.float32 or _varlen_kernel() is None):
            print(json.dumps({"skipped": "varlen", "why": "needs CUDA, fp16/bf16 and flash-attn or torch>=2.10"}))
            continue
        modes.append(m)

    def run(model, x):
        with torch.no_grad():
            return model(x.to(next(model.parameters()).dtype), grid_thw=grid).pooler_output

    # the patch embedding alone: HF's Conv3d against one matmul on the same weight (models/patch_embed.py; every
    # mode but hf runs the matmul)
    from vigorl_cli.models.aligned_mlp import aligned_mlp_modules, set_aligned_mlp
    from vigorl_cli.models.patch_embed import set_patch_embed

    def timings(fn) -> list[float]:
        """Seconds of ``fn(i)`` for ``i`` in ``range(--reps)``, each call between two device syncs."""
        times = []
        for i in range(args.reps):
            sync()
            t0 = time.perf_counter()
            fn(i)
            sync()
            times.append(time.perf_counter() - t0)
        return times

    def best_ms(fn) -> float:
        """Best of ``--reps`` timed calls of ``fn()`` after ``--warmup`` (at least one), in ms."""
        with torch.no_grad():
            for _ in range(max(1, args.warmup)):
                fn()
            return round(1000 * min(timings(lambda i: fn())), 3)

    patch_embed = {}
    for linear in (False, True):
        set_patch_embed(tower, linear)
        patch_embed["linear" if linear else "conv3d"] = best_ms(lambda: tower.patch_embed(inputs[0]))
    print(json.dumps({"patch_embed_best_ms": patch_embed}), flush=True)
    # one block's MLP alone: HF's width against the aligned one (models/aligned_mlp.py; only unaligned widths)
    mlp_ms = {}
    mlps = aligned_mlp_modules(tower)
    if mlps:
        h = torch.randn(n, tower.config.hidden_size, device=dev, dtype=dtype)
        for aligned in (False, True):
            set_aligned_mlp(tower, aligned)
            mlp_ms["aligned" if aligned else "unaligned"] = best_ms(lambda: mlps[0](h))
        print(json.dumps({"mlp_best_ms": mlp_ms, "width": mlps[0].gate_proj.out_features}), flush=True)

    results, outs = {}, {}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    for mode in modes:
        base, *extras = mode.split("+")
        set_vision_attention(tower, base)
        # +conv / +unaligned: HF's Conv3d patch embedding / HF's unaligned MLP width in this mode (for comparison)
        if "conv" in extras:
            set_patch_embed(tower, False)
        if "unaligned" in extras:
            set_aligned_mlp(tower, False)
        if "compile" in extras:  # model.compile's regional compile of the blocks' norms and MLPs (stays on: run last)
            from vigorl_cli.models.compile import compile_blocks, is_compiled

            if not is_compiled(tower):
                compile_blocks(tower)
        for i in range(args.warmup):
            run(tower, inputs[i % 2])
        sync()
        calls = []

        def counting(*a, _c=calls, **kw):
            _c.append(1)
            return real_sdpa(*a, **kw)

        torch.nn.functional.scaled_dot_product_attention = counting
        try:
            outs[mode] = run(tower, inputs[0]).float()
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
        times = timings(lambda i: run(tower, inputs[i % 2]))
        best, med = min(times), statistics.median(times)
        results[mode] = {"best_ms": round(1000 * best, 2), "median_ms": round(1000 * med, 2),
                         "img_per_s": round(args.images / best, 1), "tflops": round(flops / best / 1e12, 2),
                         "sdpa_calls_per_forward": len(calls)}
        print(json.dumps({mode: results[mode]}), flush=True)

    if args.profile and modes:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                run(tower, inputs[i % 2])
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"profile of {modes[-1]} (3 forwards):")
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))

    ref32 = None
    if ref_tower is not None:
        set_vision_attention(ref_tower, "hf")
        ref32 = run(ref_tower, inputs[0]).float()
    base = outs.get("hf")
    for mode, out in outs.items():
        r = results[mode]
        if base is not None:
            r["max_abs_diff_vs_hf"] = float((out - base).abs().max())
            r["rel_l2_vs_hf"] = float((out - base).norm() / base.norm())
        if ref32 is not None:
            r["rel_l2_vs_hf_fp32"] = float((out - ref32).norm() / ref32.norm())
        r["finite"] = bool(torch.isfinite(out).all())
    final = {"benchmark": "vision_encoder", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
             "torch": torch.__version__, "transformers": __import__("transformers").__version__,
             "shape": "tiny" if args.tiny else args.shape, "layers": vc.depth, "images": args.images,
             "size": args.size, "dtype": str(dtype).replace("torch.", ""), "tflop_per_forward": round(flops / 1e12, 3),
             "floor_ms": round(1000 * flops / (args.peak_tflops * 1e12), 2), "results": results,
             "patch_embed_best_ms": patch_embed, "mlp_best_ms": mlp_ms}
    if "hf" in results:
        final["ratio_hf_over"] = {m: round(results["hf"]["best_ms"] / results[m]["best_ms"], 2)
                                  for m in results if m != "hf"}
    print(json.dumps(final), flush=True)
    print(f"\n{final['device']}, {final['dtype']}, {args.images} × {args.size}², {vc.depth} blocks, "
          f"{final['tflop_per_forward']} TFLOP/forward (floor {final['floor_ms']} ms at {args.peak_tflops:g} TFLOP/s)")
    print(f"{'mode':<9}{'best ms':>10}{'median ms':>11}{'× vs hf':>9}{'sdpa calls':>12}{'max|Δ| vs hf':>14}"
          f"{'rel vs fp32':>13}")
    for m, r in results.items():
        ratio = final.get("ratio_hf_over", {}).get(m, 1.0 if m == "hf" else float("nan"))
        print(f"{m:<9}{r['best_ms']:>10.2f}{r['median_ms']:>11.2f}{ratio:>9.2f}{r['sdpa_calls_per_forward']:>12}"
              f"{r.get('max_abs_diff_vs_hf', float('nan')):>14.2e}{r.get('rel_l2_vs_hf_fp32', float('nan')):>13.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
