#!/usr/bin/env python3
"""Decode-step attention over a static KV cache: which kernel, at the shapes our decode loops run.

One decode step of every slot: ``B`` rows of one query token each, Qwen2.5-VL-3B's attention shape (16 query heads,
2 key/value heads, head dim 128), bf16, attending to the first ``W`` positions of the cache (the read width, a multiple
of 512 in the streaming engine) under a boolean ``[B, 1, 1, W]`` mask (each slot sees its own prefix). A profile of
the multi-turn rollout on an H200 (docs/performance.md, issue 7) put this at ~55 µs per layer — ~2 ms of an 8 ms
decode step at 32 slots — in cuDNN's masked flash kernel, for a few MB of keys and values. Arms:

  hf_repeat         transformers' sdpa path: every key/value head repeated for its query heads (``repeat_kv``), then
                    sdpa with the mask (what a static cache runs without our attention function)
  grouped           ours (``engines/static_decode._decode_attention``): the query heads sharing a key/value head become
                    that head's queries, sdpa on the cache as stored; torch picks the kernel
  grouped_cudnn / grouped_efficient / grouped_math
                    the same with sdpa restricted to one backend (skipped where it does not take these inputs)
  grouped_matmul    the same product written out: two batched matrix products around a float32 softmax (in bf16
                    the scores come out of the first product rounded to bf16, unlike the fused kernels' float32
                    scores: its error column says what that costs)

Each arm runs ``--layers`` times inside one CUDA graph (as in a captured decode step, so launch overhead does not
count) and reports microseconds per call, median over ``--reps`` replays, beside its error against a float32
reference (relative L2).

    python benchmarks/decode_attention.py                 # GPU: B=32, W in 512..4096
    python benchmarks/decode_attention.py --cpu           # CPU smoke test: small shapes, fp32, eager timing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vigorl_cli.engines.static_decode import _decode_attention


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``[B, Hkv, G, D]`` grouped queries over ``[B, Hkv, W, D]`` keys/values, ``[B, 1, 1, W]`` bool mask."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def reference(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """float64, key/value heads repeated per query head, one softmax per head: ``[B, 1, Hq, D]``."""
    G = q4.shape[1] // k.shape[1]
    kr, vr = (t.double().repeat_interleave(G, dim=1) for t in (k, v))
    scores = (q4.double() @ kr.transpose(-1, -2)) * scale  # [B, Hq, 1, W]
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ vr).transpose(1, 2).float()


def arms(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> dict:
    """name → function of no arguments returning ``[B, 1, Hq, D]`` (HF's attention-output layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, _, D = q4.shape
    Hkv = k.shape[1]
    module = SimpleNamespace(num_key_value_groups=Hq // Hkv, is_causal=False, training=False)
    out = {"hf_repeat": lambda: sdpa_attention_forward(module, q4, k, v, mask, scaling=scale)[0],
           "grouped": lambda: _decode_attention(module, q4, k, v, mask, scaling=scale)[0]}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        def run(_backend=backend):
            with sdpa_kernel([_backend]):
                return _decode_attention(module, q4, k, v, mask, scaling=scale)[0]
        out[f"grouped_{name}"] = run
    qg = q4.reshape(B, Hkv, Hq // Hkv, D)
    out["grouped_matmul"] = lambda: matmul_attention(qg, k, v, mask, scale).reshape(B, Hq, 1, D).transpose(1, 2)
    return out


def time_arm(fn, device: torch.device, layers: int, reps: int) -> float:
    """Microseconds per call: ``layers`` calls captured in one CUDA graph on a GPU (eager on CPU), median replay."""
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(layers):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / layers)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(layers):
            fn()
        times.append((time.perf_counter() - t) * 1e6 / layers)
    return statistics.median(times)


def run(batch: int, widths: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
        device: torch.device, layers: int, reps: int, seed: int = 0) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for W in widths:
        q4 = torch.randn(batch, heads, 1, dim, generator=gen).to(device, dtype)
        k = torch.randn(batch, kv_heads, W, dim, generator=gen).to(device, dtype)
        v = torch.randn(batch, kv_heads, W, dim, generator=gen).to(device, dtype)
        seen = torch.randint(1, W + 1, (batch,), generator=gen)  # each slot's prefix length
        mask = (torch.arange(W)[None] < seen[:, None]).view(batch, 1, 1, W).to(device)
        scale = dim ** -0.5
        ref = reference(q4, k, v, mask, scale)
        row = {"batch": batch, "width": W, "arms": {}}
        for name, fn in arms(q4, k, v, mask, scale).items():
            try:
                out = fn()
            except RuntimeError as e:  # a backend that does not take these inputs
                row["arms"][name] = {"skipped": str(e).splitlines()[0][:160]}
                continue
            err = ((out.float() - ref).norm() / ref.norm()).item()
            try:
                us = time_arm(fn, device, layers, reps)
            except RuntimeError as e:  # e.g. not capturable
                row["arms"][name] = {"rel_err": err, "skipped": str(e).splitlines()[0][:160]}
                continue
            row["arms"][name] = {"us_per_call": round(us, 2), "rel_err": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small shapes in fp32 on the CPU (smoke test)")
    ap.add_argument("--batch", type=int, default=32, help="slots (rows of one decode step)")
    ap.add_argument("--widths", default="512,1024,2048,4096", help="cache positions read (comma-separated)")
    ap.add_argument("--layers", type=int, default=36, help="calls per captured graph (the 3B's decoder layers)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
        batch, widths, heads, kv, dim, layers, reps = 4, [64, 128], 4, 2, 32, 2, 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --cpu for the smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16
        batch, widths, heads, kv, dim = args.batch, [int(w) for w in args.widths.split(",")], 16, 2, 128
        layers, reps = args.layers, args.reps
    rows = run(batch, widths, heads, kv, dim, dtype, device, layers, reps)
    result = {"benchmark": "decode_attention", "device": torch.cuda.get_device_name(0) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "heads": heads, "kv_heads": kv, "dim": dim,
              "dtype": str(dtype), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
