"""MCTS throughput: our batched driver vs the reference's request pattern, same engine, model and data.

* **reference pattern** (`drive_sequential`): one tree at a time, one request per child / rollout step (``n = 1``),
  each waiting for the previous one: what grounded-rl's ``MonteCarloTreeSearch`` does against its vLLM server;
* **ours** (`drive_batched`): ``--trees-in-flight`` trees at once, every pending generation of all of them in one
  ``engine.generate`` call, the samples of an expansion as one ``n = k`` request.

Both use the HF engine on a Qwen2.5-VL-3B-shaped random-weight model (``vigorl_cli.models.shapes``) and the same
demo V*-like images; a random model over a 152 k vocabulary practically never samples eos, so every step generates
exactly ``--max-new-tokens`` tokens in both patterns. The reference pattern is slow, so it runs for
``--ref-seconds`` and its rate is measured over the steps it finished; ours runs ``--samples`` whole trees.

Metric: generated thought steps ("nodes": tree nodes and rollout steps) per second, tokens per second, and grounded
nodes per second (steps whose text names an ``(x, y)``: near 0 for random weights, reported for real teachers).

    python benchmarks/mcts_throughput.py                       # GPU: 3B-shaped model (needs CUDA)
    python benchmarks/mcts_throughput.py --tiny --samples 4    # CPU smoke test with tiny-qwen2.5-vl

Prints one JSON line per pattern and a final comparison; writes it to --json if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Deadline(Exception):
    pass


class _TimedEngine:
    """Passes calls through until ``deadline`` (time.perf_counter), then stops the run."""

    def __init__(self, engine, deadline: float):
        self.engine, self.deadline = engine, deadline
        self.name = engine.name

    def generate(self, requests):
        if time.perf_counter() > self.deadline:
            raise _Deadline
        return self.engine.generate(requests)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-vl-3b")
    ap.add_argument("--tiny", action="store_true", help="tiny-qwen2.5-vl on CPU (smoke test)")
    ap.add_argument("--data", default="visual_search/vigorl_search_MCTS.jsonl", help="demo file (V*-like images)")
    ap.add_argument("--samples", type=int, default=32, help="trees searched by our driver")
    ap.add_argument("--trees-in-flight", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256, help="HF engine rows per generate call (ours)")
    ap.add_argument("--ref-seconds", type=float, default=300.0, help="wall time given to the reference pattern")
    ap.add_argument("--simulations", type=int, default=2)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--rollout-steps", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="per thought step (reference: 512)")
    ap.add_argument("--max-pixels", type=int, default=504 * 504, help="image budget of the processor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from vigorl_cli.agent.parse import find_points
    from vigorl_cli.data.demo import generate_demo
    from vigorl_cli.engines.base import SamplingParams
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.models.load import load_model
    from vigorl_cli.search.api import load_samples, model_frame
    from vigorl_cli.search.mcts import Counters, MCTSSettings, TreeSearch, drive_batched, drive_sequential
    from vigorl_cli.vision.frames import resize_image

    work = Path(tempfile.mkdtemp(prefix="mctstp-"))
    root = work / "demo"
    generate_demo(root, n_per_task=max(40, 2 * args.samples))
    if args.tiny:
        bundle = load_model("tiny-qwen2.5-vl", attn_implementation="sdpa")
        name = "tiny-qwen2.5-vl"
    else:
        from vigorl_cli.models.shapes import shaped_bundle

        t = time.time()
        bundle = shaped_bundle(args.shape, max_pixels=args.max_pixels)
        name = args.shape
        print(f"built {args.shape} in {time.time() - t:.1f}s", flush=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    samples, _ = load_samples([args.data], root)
    settings = MCTSSettings(simulations=args.simulations, children_per_expand=args.children,
                            rollouts_per_node=args.rollouts, rollout_max_steps=args.rollout_steps, preset="vstar",
                            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens),
                            seed=0)
    images: dict[str, tuple] = {}

    def searches(subset, counters):
        for s in subset:
            if s.id not in images:
                with Image.open(s.image_paths(root)[0]) as im:
                    original = im.convert("RGB")
                frame = model_frame(*original.size, bundle.processor)
                images[s.id] = (resize_image(original, frame), frame)
            shown, frame = images[s.id]
            yield TreeSearch(s, shown, frame, bundle.processor, settings, counters=counters)

    def grounded(rec) -> int:
        nodes = [n for n in rec.tree.iter_nodes()][1:]
        n = sum(1 for x in nodes if find_points(x.thought_text))
        for x in rec.tree.iter_nodes():
            for ro in x.rollouts:
                n += sum(1 for t in ro.ephemeral_texts[len(ro.ephemeral_texts) - ro.depth:] if find_points(t))
        return n

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def run(label: str, fn, subset, engine) -> dict:
        counters, finished = Counters(), []
        sync()
        t = time.perf_counter()
        try:
            fn(engine, searches(subset, counters), lambda s: finished.append(s))
        except _Deadline:
            pass
        sync()
        dt = time.perf_counter() - t
        g = sum(grounded(s.tree_record()) for s in finished if s.error is None)
        out = {"pattern": label, "device": dev, "model": name, "trees_finished": len(finished),
               "steps": counters.steps, "tokens": counters.tokens, "seconds": round(dt, 3),
               "nodes_per_s": round(counters.steps / dt, 3), "tokens_per_s": round(counters.tokens / dt, 1),
               "grounded_nodes_per_s": round(g / dt, 3),
               "errors": [s.error for s in finished if s.error is not None][:3]}
        print(json.dumps(out), flush=True)
        return out

    eng = HFEngine(bundle, batch_size=args.batch, seed=0)
    # warm-up (kernels, allocator, image processor), not timed
    run("warmup", lambda e, it, f: drive_batched(e, it, f, in_flight=2), samples[:2],
        _TimedEngine(eng, time.perf_counter() + (5 if args.tiny else 30)))
    ref_engine = _TimedEngine(HFEngine(bundle, batch_size=1, seed=0), time.perf_counter() + args.ref_seconds)
    results = {
        "reference_pattern": run("reference_pattern", drive_sequential, samples[:args.samples], ref_engine),
        "ours_batched": run("ours_batched",
                            lambda e, it, f: drive_batched(e, it, f, in_flight=args.trees_in_flight),
                            samples[:args.samples], eng),
    }
    results["reference_pattern"]["ref_seconds_budget"] = args.ref_seconds
    speedup = results["ours_batched"]["nodes_per_s"] / max(1e-9, results["reference_pattern"]["nodes_per_s"])
    final = {"benchmark": "mcts_throughput", "model": name, "device": dev, "data": args.data,
             "settings": {k: getattr(args, k) for k in ("samples", "trees_in_flight", "batch", "simulations",
                                                        "children", "rollouts", "rollout_steps", "max_new_tokens",
                                                        "max_pixels")},
             "results": results, "speedup_nodes_per_s": round(speedup, 2)}
    print(json.dumps(final), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
