#!/usr/bin/env python3
"""Prefill attention over a static KV cache with grouped-query heads: HF's path against grouped alternatives.

A prefill of the streaming engine feeds ``B`` rows of ``T`` new tokens each into a slot cache that already holds
each row's earlier turns (its prefix) and attends under a boolean ``[B, 1, T, W]`` mask (row ``b``'s token ``t``
sees the first ``prefix_b + t + 1`` positions). Qwen2.5-VL-3B's language model has 16 query heads over 2 key/value
heads; with a mask, HF's sdpa path repeats every key/value head 8 times (``repeat_kv``: a copy of the whole read
width per layer) and then runs a masked kernel. At 512 episodes on an H200 the language model's prefills took
~11 s of device time (docs/performance.md, issue 7), about a sixth of the multi-turn loop. Arms:

  hf_repeat      transformers' ``sdpa_attention_forward`` (what the prefill runs now)
  gqa            one sdpa call with ``enable_gqa=True`` and the mask: no copy; torch picks the kernel
  grouped_fold   the 8 query heads that share a key/value head folded into the query length (``[B, 2, 8·T, D]``),
                 the mask repeated along it: sdpa on the cache as stored (the decode step's trick, for T > 1)
  grouped_fold_additive  the same with the mask as an additive tensor in the activations' dtype (built once)
(transformers notes that on CUDA a masked ``enable_gqa`` call falls back to the math kernel: the ``gqa`` arm shows it.)
Each arm runs twice: with torch's choice of kernel, and as ``NAME@engine`` inside the context the engine's prefills run
in (``fused_attention``: flash / memory-efficient / math, no cuDNN, whose per-shape planning costs host time when
every prefill has new shapes; a graph replay hides that cost, so only the ``@engine`` arms say what a prefill gets).
``fold_mask_build`` times building the folded additive mask, which a prefill would do once for all its layers.

Each arm runs ``--layers`` times inside one CUDA graph and reports µs per call (median of ``--reps`` replays) and
its error against a float32 reference (relative L2).

    python benchmarks/prefill_attention.py          # GPU: B=8, T=384, W in 1024..4096 (~30 s)
    python benchmarks/prefill_attention.py --cpu    # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode_attention import time_arm
from vigorl_cli.models.vision_attention import fused_attention


def reference(q, k, v, mask, scale):
    """float32, key/value heads repeated, one softmax per head: ``[B, T, Hq, D]``."""
    G = q.shape[1] // k.shape[1]
    kr, vr = (t.float().repeat_interleave(G, dim=1) for t in (k, v))
    scores = (q.float() @ kr.transpose(-1, -2)) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vr).transpose(1, 2)


def arms(q, k, v, mask, scale) -> dict:
    """name → function of no arguments returning ``[B, T, Hq, D]`` (HF's attention-output layout)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    module = SimpleNamespace(num_key_value_groups=G, is_causal=False, training=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    folded_mask = mask.repeat(1, 1, G, 1)  # [B, 1, G·T, W]: folded position g·T + t is token t

    def build():  # the folded mask as an additive one in the activations' dtype: once per forward in an engine
        return torch.zeros(folded_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask.repeat(1, 1, G, 1), float("-inf"))

    additive = build()

    def fold(m):
        out = sdpa(q.reshape(B, Hkv, G * T, D), k, v, attn_mask=m, scale=scale)
        return out.reshape(B, Hq, T, D).transpose(1, 2)

    plain = {"hf_repeat": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
             "gqa": lambda: sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2),
             "grouped_fold": lambda: fold(folded_mask),
             "grouped_fold_additive": lambda: fold(additive)}

    def engine(fn):  # the streaming engine's prefill context: flash / memory-efficient / math, never cuDNN
        def run():
            with fused_attention(q.device):
                return fn()
        return run

    return {**plain, **{f"{name}@engine": engine(fn) for name, fn in plain.items()}, "fold_mask_build": build}


def run(batch, new, widths, heads, kv_heads, dim, dtype, device, layers, reps, seed=0) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for W in widths:
        q = torch.randn(batch, heads, new, dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, kv_heads, W, dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, kv_heads, W, dim, generator=gen).to(device, dtype)
        prefix = torch.randint(0, W - new + 1, (batch,), generator=gen)  # each row's cached tokens
        seen = prefix[:, None] + torch.arange(1, new + 1)[None]  # [B, T]: positions token t sees
        mask = (torch.arange(W)[None, None] < seen[:, :, None]).view(batch, 1, new, W).to(device)
        scale = dim ** -0.5
        ref = reference(q, k, v, mask, scale)
        row = {"batch": batch, "new_tokens": new, "width": W, "arms": {}}
        for name, fn in arms(q, k, v, mask, scale).items():
            try:
                out = fn()
                err = None if name == "fold_mask_build" else ((out.float() - ref).norm() / ref.norm()).item()
                row["arms"][name] = {"us_per_call": round(time_arm(fn, device, layers, reps), 2), "rel_err": err}
            except RuntimeError as e:  # a kernel that does not take these inputs, or not capturable
                row["arms"][name] = {"skipped": str(e).splitlines()[0][:160]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ref
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small shapes in fp32 on the CPU (smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="rows of one prefill (the engine's prefill_min at 32 slots)")
    ap.add_argument("--new", type=int, default=384, help="new tokens per row (a zoom crop's turn: ~330 + text)")
    ap.add_argument("--widths", default="1024,2048,4096", help="cache positions read (comma-separated)")
    ap.add_argument("--layers", type=int, default=36, help="calls per captured graph (the 3B's decoder layers)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        batch, new, widths, heads, kv, dim, layers, reps = 2, 8, [32, 64], 4, 2, 16, 2, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --cpu for the smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16
        batch, new, widths = args.batch, args.new, [int(w) for w in args.widths.split(",")]
        heads, kv, dim, layers, reps = 16, 2, 128, args.layers, args.reps
    rows = run(batch, new, widths, heads, kv, dim, dtype, device, layers, reps)
    result = {"benchmark": "prefill_attention", "device": torch.cuda.get_device_name(0) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "heads": heads, "kv_heads": kv, "dim": dim,
              "dtype": str(dtype), "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
