"""GRPO step on the GPU: one rollout step broken into rollout / reward / old log-probs / ref log-probs / update.

Runs `vigorl grpo`'s own loop (`vigorl_cli.train.grpo.train`) on a Qwen2.5-VL-3B-shaped random-weight model written
to a temporary folder, with the HF engine sampling from the live policy, on the demo V*-like data.

    python benchmarks/grpo_step.py --steps 2 --prompts 8 --group 4 --max-new-tokens 128     # GPU
    python benchmarks/grpo_step.py --tiny --steps 2                                         # CPU smoke test

Prints the per-step metrics (times per phase, tokens/s, peak memory) as JSON lines and writes --json.

``--multiturn --scripted-zooms K``: the memory case of multi-turn GRPO. A random-weight model never emits a valid tool
call, so its "multi-turn" episodes end after one turn; with this flag the first K turns of every episode are
scripted tool calls (zooms at K different points of the image, each crop observed as a new image of
``tool.crop_size``), and turn K + 1 is sampled by the HF engine over all K + 1 images. The trainer then sees
sequences of K + 1 images and K observation turns, as a trained model's rollouts would. The scripted turns carry a
constant log-prob of -1 (the engine-vs-trainer log-prob difference is meaningless for them; ``grpo.tis_cap`` is off).
The run ends with a checkpoint of the 3B policy (fp32 weights + AdamW state, ~37 GB): give it a machine with that
much free disk (a run after grpo_vs_trl.py on the same machine once failed writing it).
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
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--multiturn", action="store_true")
    ap.add_argument("--scripted-zooms", type=int, default=0, metavar="K",
                    help="with --multiturn: script the first K turns of every episode as zoom tool calls")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from vigorl_cli.data.demo import generate_demo
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.grpo import train

    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    root = work / "demo"
    generate_demo(root, n_per_task=64)
    if args.tiny:
        model = "tiny-qwen2.5-vl"
    else:
        from vigorl_cli.models.shapes import build_shaped

        t = time.time()
        model = str(build_shaped(args.shape, work / "model", max_pixels=504 * 504))
        print(f"built {args.shape} in {time.time() - t:.1f}s", flush=True)
    n = args.prompts * args.group
    sets = [f"data.root={root}", "data.rl_train=[visual_search/vigorl_SA_RL.jsonl]", f"grpo.steps={args.steps}",
            f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group}",
            f"grpo.responses_per_update={n}", "grpo.micro_batch_size=8",
            f"grpo.sampling.max_new_tokens={args.max_new_tokens}", "grpo.truncated=keep", "grpo.save_every=1000", "engine.batch_size=64",
            "prompt.preset=vstar", "grpo.lr=1e-6"]
    if args.multiturn:
        sets += ["tool.enabled=true", "grpo.max_response_len=4096"]
        if args.scripted_zooms:
            sets += [f"tool.max_turns={args.scripted_zooms + 1}", f"tool.max_images={args.scripted_zooms + 1}"]
            _script_zooms(args.scripted_zooms)
    r = load_recipe(None, sets + list(args.set))
    t = time.time()
    s = train(r, model=model, out=work / "run", log=lambda m: print(m, flush=True))
    total = time.time() - t
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    # old and reference log-probs are separate passes (logprob_s = their sum, kept for older result files)
    keys = ("step", "rollout_s", "reward_s", "old_logprob_s", "ref_logprob_s", "logprob_s", "update_s", "tokens_per_s",
            "response_tokens", "logprob_diff_engine_vs_trainer", "grad_norm", "kl", "entropy", "turns", "crops")
    for row in rows:
        print(json.dumps({k: row.get(k) for k in keys}), flush=True)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    final = {"benchmark": "grpo_step", "device": dev, "model": "tiny" if args.tiny else args.shape,
             "responses_per_step": n, "max_new_tokens": args.max_new_tokens, "multiturn": args.multiturn,
             "scripted_zooms": args.scripted_zooms, "set": list(args.set),
             "steps": [{k: row.get(k) for k in keys} for row in rows], "total_s": round(total, 1),
             "peak_gib": peak, "final_reward": s.get("final_reward")}
    print(json.dumps(final), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


def _script_zooms(k: int) -> None:
    """Make every HF engine built from now on answer an episode's turns 0 .. k-1 with a zoom tool call."""
    import vigorl_cli.engines.hf as hf_mod
    from vigorl_cli.engines.base import Completion
    from vigorl_cli.models import prompts

    real = hf_mod.HFEngine

    class ScriptedZooms(real):
        def generate(self, requests):
            turn = [int(r.request_id.rsplit("/", 1)[-1]) if r.request_id else k for r in requests]
            out = [None] * len(requests)
            for i, (r, t) in enumerate(zip(requests, turn)):
                if t < k:
                    w, h = r.images[0].size
                    x, y = w * (t + 1) // (k + 1), h * (t + 1) // (k + 2)
                    text = f"<think> look closer at ({x}, {y}) </think>\n{prompts.tool_call_text(x, y)}"
                    ids = self.tok(text, add_special_tokens=False)["input_ids"]
                    out[i] = [Completion(ids, text, [-1.0] * len(ids), "stop", "</tool_call>")]
            rest = [i for i, t in enumerate(turn) if t >= k]
            for i, comps in zip(rest, super().generate([requests[i] for i in rest]) if rest else []):
                out[i] = comps
            return out

    hf_mod.HFEngine = ScriptedZooms


if __name__ == "__main__":
    main()
