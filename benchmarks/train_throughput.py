#!/usr/bin/env python3
"""Training throughput: plain padded HF forward/backward vs vigorl's SFT step, Qwen2.5-VL-3B shape, random weights.

Nothing is downloaded: the model is built from a ``Qwen2_5_VLConfig`` with the public Qwen2.5-VL-3B-Instruct shape
and HF's random init; samples are random token ids around one image each (random pixel values, a fixed patch grid),
with variable lengths (uniform in [--min-len, --seq-len]) as real SFT data has. The vision tower is frozen and the
language model fully trained (the SFT default). One optimizer step = --batch samples.

Variants (``--variants``; default: all):

  hf-padded-{ckpt,nockpt}      plain HF: right-padded batch, ``model(**batch, labels=labels).loss``, HF's own M-RoPE
                               positions; ckpt = ``gradient_checkpointing_enable()`` as users call it (which also
                               back-propagates through the frozen vision tower, gpu-baseline.md pitfall 1)
  ours-padded-{ckpt,nockpt}    vigorl: Collator (per-sample M-RoPE) + LogProbModel (chunked log-prob head, logits
                               only on assistant tokens) + the single-process wrapper from vigorl_cli.train.parallel;
                               ckpt without the vision-tower hook; vision attention one call per layer
                               (models/vision_attention.py; the hf variants keep HF's per-window loop)
  ours-packed-{ckpt,nockpt}    the same, padding-free: all samples of the step in one row; attention per sample in
                               one causal sdpa call (models/packed_attention.py), no T×T mask
  ours-packed-*-compile        the same with ``model.compile`` (regional torch.compile of the norms and MLPs of
                               every decoder layer and vision block; models/compile.py); compile time is spent in
                               the warm-up steps
  hf-logprob-nockpt            the GRPO old/ref log-prob pass, forward only: plain HF ``model(...,
                               logits_to_keep=K).logits`` (K = longest reply + 1, as TRL does), fp32 log-softmax
                               row by row, gather; HF's per-window vision attention
  ours-logprob-nockpt[-compile]  ``LogProbModel`` forward on a packed batch under no_grad (what vigorl grpo runs)

The default set is the training variants; the log-prob variants are run by ``--variants`` (use --min-len 2048
--batch 16 for gpu-baseline.md's 16 × 2048 shape).

Printed per variant: real tokens per step, padded tokens per step, step time (median of --steps after --warmup),
tokens/s (real tokens), peak GPU memory, MFU = 6 · N_LM · real tokens / time / --peak-tflops (2 · N_LM for the
forward-only log-prob variants; N_LM: language-model
parameters with the tied embedding counted once, as in gpu-baseline.md; the frozen vision forward, the attention
flops and the checkpoint recompute are not counted), and for ours the CPU collate time per step (not in the step
time: both sides get their batches built beforehand).

Weights (``--weights``): ``bf16`` = bf16 parameters and AdamW state for every variant (as gpu-baseline.md measured
the baseline); ``fp32-autocast`` = fp32 master weights + bf16 autocast (what ``vigorl sft`` does on one GPU).

Usage:
  python benchmarks/train_throughput.py --tiny                     # CPU smoke test, tiny dims, well under a minute
  python benchmarks/train_throughput.py                            # one GPU, every variant; JSON to $OUT if set
  python benchmarks/train_throughput.py --variants ours-packed-ckpt,hf-padded-ckpt --batch 8 --weights fp32-autocast
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vigorl_cli.models.compile import compile_blocks, uncompile
from vigorl_cli.models.vision_attention import set_vision_attention
from vigorl_cli.train.batching import IGNORE, Collator, Example, LogProbModel, rope_index_of
from vigorl_cli.train.parallel import Dist, OptimConfig, wrap

VARIANTS = ["hf-padded-ckpt", "hf-padded-nockpt", "ours-padded-ckpt", "ours-padded-nockpt", "ours-packed-ckpt",
            "ours-packed-nockpt", "ours-packed-ckpt-compile", "ours-packed-nockpt-compile",
            "hf-logprob-nockpt", "ours-logprob-nockpt", "ours-logprob-nockpt-compile"]
DEFAULT_VARIANTS = VARIANTS[:8]
T0 = time.perf_counter()

# Qwen2.5-VL-3B-Instruct token ids; random text ids are drawn below the special-token range.
REAL_IDS = dict(image=151655, video=151656, vs=151652, ve=151653, bos=151643, eos=151645, pad=151643, text_hi=151643)
TINY_IDS = dict(image=995, video=996, vs=992, ve=993, bos=990, eos=991, pad=990, text_hi=990)


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def build_config(tiny: bool):
    """The public Qwen2.5-VL-3B-Instruct config.json values (or a tiny model of the same structure)."""
    from transformers import Qwen2_5_VLConfig

    ids = TINY_IDS if tiny else REAL_IDS
    if tiny:
        text = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=1000, max_window_layers=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1],
                      out_hidden_size=128)
    else:
        text = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                    intermediate_size=11008, vocab_size=151936, max_window_layers=70,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048)
    text.update(max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
                sliding_window=32768, attention_dropout=0.0, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                pad_token_id=ids["pad"])
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                  hidden_act="silu", tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                           video_token_id=ids["video"], vision_start_token_id=ids["vs"], vision_end_token_id=ids["ve"],
                           tie_word_embeddings=True)
    return cfg, ids


def build_model(cfg, device: torch.device, dtype: torch.dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    for p in model.model.visual.parameters():
        p.requires_grad_(False)  # frozen vision tower (the SFT default)
    return model


def lm_params(model) -> int:
    seen, n = set(), 0
    for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


class FakeImageProcessor:
    """Random pixel values for a fixed patch grid: what the processor would hand over, without decoding images."""

    merge_size = 2
    patch_size = 14

    def __init__(self, patch_dim: int):
        self.patch_dim = patch_dim
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, images, return_tensors="pt"):
        grids = torch.tensor([[1, im.size[1] // self.patch_size, im.size[0] // self.patch_size] for im in images])
        n = int(grids.prod(-1).sum())
        return {"pixel_values": torch.randn(n, self.patch_dim, generator=self.gen), "image_grid_thw": grids}


class FakeImage:
    """Only the size is read (``_open_rgb`` calls ``convert``)."""

    def __init__(self, side: int):
        self.size = (side, side)

    def convert(self, _mode):
        return self


def make_examples(n: int, args, ids: dict, seed: int) -> list[Example]:
    """Samples: text, <vs> <image_pad>×N <ve>, prompt text, then the assistant reply (labelled)."""
    rng = random.Random(seed)
    n_img = args.image_grid ** 2 // 4
    out = []
    shared: dict[int, FakeImage] = {}
    for i in range(n):
        length = rng.randint(args.min_len, args.seq_len)
        n_text = length - n_img - 2
        n_prompt = 20 + (n_text - 20) // 2
        before = [rng.randrange(ids["text_hi"]) for _ in range(20)]
        after = [rng.randrange(ids["text_hi"]) for _ in range(n_text - 20)]
        input_ids = before + [ids["vs"]] + [ids["image"]] * n_img + [ids["ve"]] + after
        reply_start = 20 + 2 + n_img + (n_prompt - 20)
        labels = [IGNORE] * reply_start + input_ids[reply_start:]
        image = shared.setdefault(i // args.share_images, FakeImage(args.image_grid * 14))  # a GRPO group's image
        out.append(Example(f"s{i}", input_ids, labels, [image]))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_checkpointing(model, on: bool, naive: bool) -> None:
    model.gradient_checkpointing_disable()
    model.disable_input_require_grads()
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not naive:
            model.disable_input_require_grads()  # keep autograd out of the frozen vision tower


def run_variant(name: str, model, steps: list[list[Example]], collator_padded, collator_packed, args,
                device: torch.device, n_lm: int) -> dict:
    impl, layout, ckpt, *extra = name.split("-")
    compiled = extra == ["compile"]
    set_checkpointing(model, ckpt == "ckpt", naive=impl == "hf")
    set_vision_attention(model, "hf" if impl == "hf" else "auto")  # HF's per-window loop vs one call per layer
    model.config.text_config._attn_implementation = "sdpa"  # LogProbModel below switches ours to vigorl_sdpa
    model.train()
    autocast = args.weights == "fp32-autocast"
    collate = collator_packed if layout == "packed" or (layout == "logprob" and impl == "ours") else collator_padded
    collate.dedupe_images = impl == "ours"  # plain HF encodes every occurrence of an image
    t = time.perf_counter()
    batches = [collate(ex) for ex in steps]
    collate_ms = 1e3 * (time.perf_counter() - t) / len(steps)
    if impl == "hf" and layout == "logprob":
        keep = max(sum(t != IGNORE for t in ex.labels) for exs in steps for ex in exs) + 1

        def hf_lp_inputs(b):  # the targets travel with their batch (not model inputs: popped in step)
            return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, mm_token_type_ids=b.mm_token_type_ids,
                        pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw, use_cache=False,
                        targets=b.targets[:, -keep:])

        batches = [hf_lp_inputs(b) for b in batches]

        def step(b):
            inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            tgt = inputs.pop("targets")
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(**inputs, logits_to_keep=keep).logits  # [B, keep, V]
                out = torch.zeros(tgt.shape, device=device)
                for r in range(logits.shape[0]):  # fp32 log-softmax one row at a time (gpu-baseline.md)
                    lp = torch.log_softmax(logits[r].float(), -1)
                    out[r] = lp.gather(-1, tgt[r].clamp(min=0)[:, None])[:, 0]
            return out.sum()

    elif impl == "hf":
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-6, fused=device.type == "cuda")

        def hf_inputs(b, examples):
            labels = torch.full_like(b.input_ids, IGNORE)  # HF shifts labels itself
            for i, ex in enumerate(examples):
                labels[i, :len(ex)] = torch.tensor(ex.labels)
            return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, mm_token_type_ids=b.mm_token_type_ids,
                        pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw, labels=labels,
                        use_cache=False)

        batches = [hf_inputs(b, ex) for b, ex in zip(batches, steps)]

        def step(b):
            inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    elif layout == "logprob":
        lp_model = LogProbModel(model, chunk_size=args.chunk).eval()
        if compiled:
            compile_blocks(lp_model)

        def step(b):
            b = b.to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return lp_model(**b.model_inputs()).sum()

    else:
        lp_model = LogProbModel(model, chunk_size=args.chunk)
        if compiled:
            compile_blocks(lp_model)
        run = wrap(lp_model, Dist("single", 0, 1, 0, device), OptimConfig(lr=1e-6, bf16=autocast))

        def step(b):
            b = b.to(device)
            with run.autocast():
                logp = run.module(**b.model_inputs())  # [B, L]
            loss = -logp.sum() / b.n_targets
            run.backward(loss, sync=True)
            run.step(1e-6)
            return loss

    if args.profile:  # one extra step under torch.profiler, after the warm-up (not in the timings)
        from torch.profiler import ProfilerActivity, profile

        for b in batches[:args.warmup]:
            step(b)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(batches[-1])
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile: {name} ---\n" + prof.key_averages().table(sort_by=key, row_limit=25,
                                                                       max_name_column_width=60), flush=True)
    real = [sum(len(e) for e in ex) for ex in steps]
    padded = [int((b["input_ids"] if isinstance(b, dict) else b.input_ids).numel()) for b in batches]
    times = []
    try:
        for i, b in enumerate(batches):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            loss = step(b)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        status = "ok"
    except torch.OutOfMemoryError:
        status = "OOM"
    if compiled:
        uncompile(model)  # the next variant runs eager
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    res = {"variant": name, "status": status, "real_tokens_per_step": statistics.mean(real[args.warmup:]),
           "padded_tokens_per_step": statistics.mean(padded[args.warmup:]), "peak_gib": peak,
           "collate_ms": collate_ms if impl == "ours" else None}
    if status == "ok":
        dt = statistics.median(times)
        tok = statistics.mean(real[args.warmup:])
        flops_per_token = (2 if layout == "logprob" else 6) * n_lm  # forward only: 2·N
        res.update(step_s=dt, step_times_s=times, tokens_per_s=tok / dt, loss=float(loss.detach()),
                   mfu=flops_per_token * tok / dt / (args.peak_tflops * 1e12))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on CPU (smoke test)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated; all: " + ", ".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="samples per optimizer step (default 4; tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="longest sample (default 2048; tiny 256)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest sample (default seq-len / 2)")
    ap.add_argument("--image-grid", type=int, default=None, help="patch grid side (36 = 504 px, 324 tokens; tiny 8)")
    ap.add_argument("--share-images", type=int, default=1,
                    help="consecutive samples showing the same image (a GRPO group's n responses; ours encodes it "
                         "once per micro-batch, plain HF once per sample)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--weights", choices=["bf16", "fp32-autocast"], default="bf16")
    ap.add_argument("--chunk", type=int, default=1024, help="rows per chunk of the log-prob head")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak measured on these GPUs")
    ap.add_argument("--profile", action="store_true",
                    help="print a torch.profiler table (top 25 kernels by self time) of one step per variant")
    ap.add_argument("--fresh-shapes", action="store_true",
                    help="each variant draws its own batches (other lengths): no variant runs on shapes an earlier "
                         "variant already ran, whose per-shape kernel plans (cuDNN attention) would still be cached "
                         "in the process; a training run meets new shapes every step")
    ap.add_argument("--json", default=None, help="write results here (default: $OUT/train_throughput.json)")
    args = ap.parse_args()
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq_len = args.seq_len or (256 if args.tiny else 2048)
    args.min_len = args.min_len or args.seq_len // 2
    args.image_grid = args.image_grid or (8 if args.tiny else 36)
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32

    import transformers

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    cfg, ids = build_config(args.tiny)
    model = build_model(cfg, device, dtype)
    n_lm = lm_params(model)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, LM {n_lm:,} (trainable, tied embedding "
        f"once), vision frozen; weights {args.weights}")
    vc = cfg.vision_config
    tok = SimpleNamespace(pad_token_id=ids["pad"], convert_tokens_to_ids=lambda t: {
        "<|vision_start|>": ids["vs"], "<|vision_end|>": ids["ve"]}[t])
    processor = SimpleNamespace(tokenizer=tok, image_processor=FakeImageProcessor(
        vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2))
    collators = [Collator(processor, cfg, rope_index_of(model), packing=p) for p in (False, True)]
    steps = [make_examples(args.batch, args, ids, seed=s) for s in range(args.warmup + args.steps)]
    results = []
    for i, name in enumerate([v.strip() for v in args.variants.split(",") if v.strip()]):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name}; choose from {', '.join(VARIANTS)}")
        log(f"{name} ...")
        if args.fresh_shapes:
            steps = [make_examples(args.batch, args, ids, seed=1000 * (i + 1) + s)
                     for s in range(args.warmup + args.steps)]
        try:
            r = run_variant(name, model, steps, *collators, args, device, n_lm)
        except torch.OutOfMemoryError:
            r = {"variant": name, "status": "OOM"}
        results.append(r)
        model.zero_grad(set_to_none=True)  # an OOM mid-step leaves gradients behind
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(json.dumps({k: v for k, v in r.items() if k != "step_times_s"}))

    header = f"{'variant':22} {'status':6} {'real tok':>9} {'padded':>8} {'step s':>8} {'tok/s':>9} {'peak GiB':>9} " \
             f"{'MFU':>6} {'collate ms':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        def f(key: str, width: int, fmt: str, r: dict = r) -> str:
            v = r.get(key)
            return (format(v, fmt) if isinstance(v, (int, float)) else "-").rjust(width)

        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None and device.type == "cuda" else "-"
        print(f"{r['variant']:22} {r['status']:6} {f('real_tokens_per_step', 9, '.0f')} "
              f"{f('padded_tokens_per_step', 8, '.0f')} {f('step_s', 8, '.3f')} {f('tokens_per_s', 9, '.0f')} "
              f"{f('peak_gib', 9, '.1f')} {mfu:>6} {f('collate_ms', 10, '.1f')}")
    out = {"args": vars(args), "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda"
           else None, "torch": torch.__version__, "transformers": transformers.__version__, "n_lm": n_lm,
           "results": results}
    path = args.json or (os.path.join(os.environ["OUT"], "train_throughput.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(out, indent=2))
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
