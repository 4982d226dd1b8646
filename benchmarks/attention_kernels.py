#!/usr/bin/env python3
"""Language-model attention for packed rows: four ways to attend within each sample, forward + backward per layer.

Qwen2.5-VL-3B's attention shape (16 query heads, 2 key/value heads, head dim 128), bf16, four samples of
1,500 / 2,048 / 1,100 / 1,900 tokens (6,548 in all). Compared, each timed forward + backward (CUDA events, median):

  block-mask     sdpa over the packed row with a block-diagonal causal ``[1, 1, T, T]`` bool mask (what transformers
                 builds for packed rows under sdpa)
  padded         sdpa with ``is_causal`` over the samples right-padded to ``[4, H, 2048, D]`` (what an unpacked
                 batch costs in attention)
  varlen         ``torch.nn.attention.varlen.varlen_attn`` over the packed row (keys/values repeated per query
                 head where the torch release has no GQA)
  vigorl         ``models/packed_attention.py``: the packed row scattered into a right-padded batch, one causal sdpa
                 call, gathered back (what ``vigorl_sdpa`` runs)

Each arm's output is checked against a float32 per-sample reference (relative L2 error printed).

    python benchmarks/attention_kernels.py              # GPU
    python benchmarks/attention_kernels.py --cpu        # CPU smoke test, small shapes, fp32
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vigorl_cli.models.packed_attention import _packed_attention, plan_from_positions  # noqa: E402


def timed(fn, device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small shapes in fp32 on the CPU (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    lens = [24, 32, 17, 30] if device.type == "cpu" else [1500, 2048, 1100, 1900]
    hq, hkv, d = (4, 2, 16) if device.type == "cpu" else (16, 2, 128)
    total, longest = sum(lens), max(lens)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, total, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, total, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, total, d, device=device, dtype=dtype, generator=g)
    grad_out = torch.randn(1, total, hq, d, device=device, dtype=dtype, generator=g)  # [1, T, H, D] as HF returns
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    plan = plan_from_positions(pos)
    scale = d ** -0.5

    # reference: each sample alone, float32
    ref = []
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, sl].float(), k[:, :, sl].float(),
                                                             v[:, :, sl].float(), is_causal=True, enable_gqa=True)
        ref.append(o[0].transpose(0, 1))
        start += n
    ref = torch.cat(ref)[None]  # [1, T, H, D]

    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    ar = torch.arange(total, device=device)
    block_mask = ((seg[:, None] == seg[None, :]) & (ar[:, None] >= ar[None, :]))[None, None]

    def leaf(x):
        return x.detach().clone().requires_grad_()

    def block():
        qq, kk, vv = leaf(q), leaf(k), leaf(v)
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=block_mask, scale=scale,
                                                             enable_gqa=True).transpose(1, 2)
        o.backward(grad_out)
        return o

    def padded_inputs(x):
        out = x.new_zeros(len(lens), x.shape[1], longest, d)
        s = 0
        for i, n in enumerate(lens):
            out[i, :, :n] = x[0, :, s:s + n]
            s += n
        return out

    qp, kp, vp = padded_inputs(q), padded_inputs(k), padded_inputs(v)

    def padded():  # attention cost of an unpacked batch (its output is compared on the real rows)
        qq, kk, vv = leaf(qp), leaf(kp), leaf(vp)
        o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2)  # [S, M, H, D]
        real = torch.cat([o[i, :n] for i, n in enumerate(lens)])[None]
        real.backward(grad_out)
        return real

    def vigorl():
        qq, kk, vv = leaf(q), leaf(k), leaf(v)
        o = _packed_attention(qq, kk, vv, plan, 0.0, scale)
        o.backward(grad_out)
        return o

    arms = {"block-mask": block, "padded": padded, "vigorl": vigorl}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None and device.type == "cuda":
        params = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        gqa = "enable_gqa" in params
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)

        def varlen():
            qq, kk, vv = leaf(q), leaf(k), leaf(v)
            q3, k3, v3 = (x[0].transpose(0, 1) for x in (qq, kk, vv))  # [T, H, D]
            if gqa:
                extra = {"enable_gqa": True}
            else:
                k3, v3, extra = k3.repeat_interleave(hq // hkv, 1), v3.repeat_interleave(hq // hkv, 1), {}
            o = varlen_attn(q3.contiguous(), k3.contiguous(), v3.contiguous(), cu, cu, longest, longest,
                            **causal, **extra)[None]
            o.backward(grad_out)
            return o

        arms["varlen"] = varlen
    results = {}
    for name, fn in arms.items():
        err = float((fn().float() - ref).norm() / ref.norm())
        ms = timed(fn, device, args.reps, args.warmup)
        results[name] = {"fwd_bwd_ms": round(ms, 3), "rel_l2_vs_fp32": err}
        print(json.dumps({name: results[name]}), flush=True)
    out = {"benchmark": "attention_kernels", "device": torch.cuda.get_device_name() if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "lens": lens, "heads": [hq, hkv], "head_dim": d,
           "results": results}
    print(json.dumps(out), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
