#!/usr/bin/env python3
"""cuBLAS at the Qwen2.5-VL vision MLP's width: 3,420 (not a multiple of 8) against padded 3,424 / 3,456.

The vision tower's MLP (1,280 → 3,420 → 1,280, SwiGLU) in bf16: at 3,420 the activations' rows and the down
weight's rows are not 16-byte aligned and cuBLAS falls back from Hopper's kernels to an Ampere ``align2`` GEMM
(models/aligned_mlp.py pads the width per forward). Times ``F.linear`` for the up (or gate) product
``[T, 1280] × [1280, N]`` and the down product ``[T, N] × [N, 1280]``, with bias, at ``N`` in ``--widths``, inside
CUDA graphs of 10 calls (median of ``--reps`` replays), ``T`` = ``--tokens`` (5,184: four 504² images); then the down
product on an aligned-stride view of width 3,420 (does a padded stride alone help?), and the kernel names cuBLAS
picks at 3,420 and 3,424 (torch.profiler).

    python benchmarks/gemm_alignment.py          # GPU only (~15 s)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=5184)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--widths", default="3420,3424,3456")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        raise SystemExit("gemm_alignment.py measures cuBLAS kernels: it needs a CUDA GPU")
    torch.manual_seed(0)
    T, H, bf = args.tokens, args.hidden, {"device": "cuda", "dtype": torch.bfloat16}

    from benchmarks.decode_attention import time_arm

    def bench(fn) -> float:
        """µs per call: median over replays of a CUDA graph of 10 calls."""
        return round(time_arm(fn, torch.device("cuda"), 10, args.reps), 1)

    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": T, "hidden": H}
    x = torch.randn(T, H, **bf)
    b_down = torch.randn(H, **bf)
    for n in (int(w) for w in args.widths.split(",")):
        w_up, b_up = torch.randn(n, H, **bf), torch.randn(n, **bf)
        h, w_down = torch.randn(T, n, **bf), torch.randn(H, n, **bf)
        up = bench(lambda w_up=w_up, b_up=b_up: F.linear(x, w_up, b_up))
        down = bench(lambda h=h, w_down=w_down: F.linear(h, w_down, b_down))
        flop = 2 * T * H * n
        out[n] = {"up_us": up, "down_us": down, "up_tflops": round(flop / up / 1e6, 1),
                  "down_tflops": round(flop / down / 1e6, 1)}
        print(json.dumps({n: out[n]}), flush=True)
    buf_w, buf_h = torch.zeros(H, 3424, **bf), torch.zeros(T, 3424, **bf)
    buf_w[:, :3420].normal_()
    buf_h[:, :3420].normal_()
    out["down_3420_on_3424_stride_us"] = bench(lambda: F.linear(buf_h[:, :3420], buf_w[:, :3420], b_down))
    print(json.dumps({"down_3420_on_3424_stride_us": out["down_3420_on_3424_stride_us"]}), flush=True)
    kernels = {}
    for n in (3420, 3424):
        w_up = torch.randn(n, H, **bf)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            F.linear(x, w_up, torch.zeros(n, **bf))
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages() if "gemm" in e.key.lower() or "nvjet" in e.key.lower()
                 or "cutlass" in e.key.lower()]
        kernels[n] = names[:2]
    out["kernels"] = kernels
    print(json.dumps({"benchmark": "gemm_alignment", **{str(k): v for k, v in out.items()}}), flush=True)


if __name__ == "__main__":
    main()
