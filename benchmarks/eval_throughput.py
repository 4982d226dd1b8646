"""Eval throughput: the episode runner (all pending turns batched) vs a one-request-at-a-time loop.

Same engine (HF), same model, same data, same sampling, in one process, side by side. The sequential loop is the
reference's request pattern (one HTTP request per sample per turn, waiting for each).

    python benchmarks/eval_throughput.py --shape qwen2.5-vl-3b --n 64 --max-new-tokens 128   # GPU
    python benchmarks/eval_throughput.py --tiny --n 8                                       # CPU smoke test

Prints one JSON line per configuration and a final comparison; writes it to --json if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-vl-3b")
    ap.add_argument("--tiny", action="store_true", help="tiny-qwen2.5-vl on CPU (smoke test)")
    ap.add_argument("--n", type=int, default=64, help="questions")
    ap.add_argument("--bench", default="demo-spatial")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--multiturn", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from vigorl_cli.data.demo import generate_demo
    from vigorl_cli.engines.base import SamplingParams
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.eval.benchmarks import get_benchmark
    from vigorl_cli.eval.runner import EvalSettings, evaluate
    from vigorl_cli.models.load import load_model

    work = Path(tempfile.mkdtemp(prefix="evtp-"))
    root = work / "demo"
    generate_demo(root, n_per_task=max(40, 16 * args.n))
    if args.tiny:
        bundle = load_model("tiny-qwen2.5-vl", attn_implementation="sdpa")
    else:
        from vigorl_cli.models.shapes import shaped_bundle

        t = time.time()
        bundle = shaped_bundle(args.shape, max_pixels=504 * 504)
        print(f"built {args.shape} in {time.time() - t:.1f}s", flush=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    bench = get_benchmark(args.bench)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    results = {}

    def run(name: str, batch: int, chunk: int) -> dict:
        eng = HFEngine(bundle, batch_size=batch, seed=0)
        st = EvalSettings(data_root=root, out_dir=work / name, sampling=sampling, limit=args.n, chunk=chunk,
                          mode="multi" if args.multiturn else "auto")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        s = evaluate(bench, eng, bundle.processor, st)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        tokens = s["tokens_per_sample"] * s["draws"]
        out = {"config": name, "device": dev, "n": s["n"], "seconds": round(dt, 3),
               "samples_per_s": round(s["n"] / dt, 3), "gen_tokens_per_s": round(tokens / dt, 1),
               "tokens_per_sample": s["tokens_per_sample"], "mean_turns": s["mean_turns"]}
        print(json.dumps(out), flush=True)
        return out

    # warm-up (kernels, allocator), not timed
    HFEngine(bundle, batch_size=4).generate([])
    run("warmup", args.batch, args.batch) if not args.tiny else None
    results["sequential"] = run("sequential", 1, 1)
    results["batched"] = run("batched", args.batch, args.batch)
    speedup = results["batched"]["samples_per_s"] / results["sequential"]["samples_per_s"]
    final = {"benchmark": "eval_throughput", "model": args.shape if not args.tiny else "tiny-qwen2.5-vl",
             "bench": args.bench, "max_new_tokens": args.max_new_tokens, "batch": args.batch,
             "results": results, "speedup": round(speedup, 2)}
    print(json.dumps(final), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
