"""`vigorl sft`: supervised fine-tuning of a Qwen-VL model on sharegpt conversations, one function top to bottom.

    vigorl sft --recipe recipes/demo.yaml --out runs/sft                       # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m vigorl_cli sft --recipe recipes/vstar.yaml \\
        --set sft.parallel=fsdp2 --out runs/sft                                # FSDP2 (or deepspeed) on 8 GPUs

Re-running the same command on the same ``--out`` resumes from the last checkpoint and continues the loss curve
exactly as the uninterrupted run would (same data order, optimizer state, RNG; the learning rate is a function of
the step). What the loop does, and where it departs from the reference (LLaMA-Factory, reference §4):

* loss = summed NLL of assistant tokens / assistant tokens of the whole optimizer step over all ranks and
  micro-batches (HF Trainer's ``num_items_in_batch`` normalisation), so gradient accumulation and the number of
  ranks do not change the update;
* learning rate: linear warmup to the peak over ``warmup_ratio`` of the steps (the first step already uses
  ``lr/(warmup+1)``; HF's schedule spends it at 0), then cosine decay towards 0;
* an epoch is ``len(data) // global_batch`` steps over a seeded permutation; the remainder is skipped that epoch.
"""

from __future__ import annotations

import hashlib
import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vigorl_cli.errors import CheckpointError, DataError, RecipeError
from vigorl_cli.recipe import Recipe


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup over ``round(warmup_ratio * total)`` steps, then cosine decay towards 0."""
    warmup = round(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: a slice of epoch ``step // steps_per_epoch``'s permutation."""
    per_epoch = n // global_batch
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[j * global_batch:(j + 1) * global_batch].tolist()


def load_sft_data(files: list[Path], processor, roots: list[Path], max_seq_len: int, max_samples: int | None,
                  seed: int, log: Callable[[str], None]):
    """Read and encode SFT files; bad lines and unusable samples are reported, counted and skipped."""
    from vigorl_cli.data.formats import read_sft
    from vigorl_cli.train.batching import Prepared, prepare_sft

    prepared = Prepared([])
    bad_lines = 0
    for f in files:
        records, errors = read_sft(f)
        for e in errors[:10]:
            log(f"skipped {e}")
        if len(errors) > 10:
            log(f"... and {len(errors) - 10} more bad lines in {f}")
        bad_lines += len(errors)
        if max_samples is not None and len(records) > max_samples:
            random.Random(seed).shuffle(records)
            records = records[:max_samples]
        prepare_sft(records, processor, [*roots, Path(f).parent], max_seq_len, start=prepared)
    for m in prepared.messages[:10]:
        log(f"dropped {m}")
    return prepared, bad_lines


def _data_files(recipe: Recipe, data: list[str | Path] | None, key: str) -> list[Path]:
    if data:
        return [Path(p) for p in data]
    root = recipe.data_root()
    return [root / p for p in getattr(recipe.data, key)]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _resume_key(recipe: Recipe, files: list[Path], n_examples: int) -> dict[str, Any]:
    """What must not change between a run and its resumption (else the loss curve would silently differ)."""
    sft = {k: v for k, v in recipe.to_dict()["sft"].items() if k not in ("save_every", "keep_last", "log_every",
                                                                          "eval_every", "logprob_chunk")}
    return {"model": recipe.model.name, "seed": recipe.seed, "sft": sft, "data": [str(f) for f in files],
            "n_examples": n_examples}


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def build_model(recipe: Recipe, log: Callable[[str], None]):
    """Model (fp32 master weights) + processor, vision tower frozen, LoRA and gradient checkpointing applied."""
    from vigorl_cli.models.load import load_model

    cfg = recipe.sft
    bundle = load_model(recipe.model.name, dtype="float32", attn_implementation=recipe.model.attn_implementation,
                        device="cpu", min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels,
                        revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                        vision_attention=recipe.model.vision_attention)
    hf = bundle.model
    hf.config.use_cache = False
    if cfg.freeze_vision:
        for p in hf.model.visual.parameters():
            p.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules)
        hf = get_peft_model(hf, lora)
        # peft freezes everything but the adapters: the vision setting is only honoured through the target regex
        vision_adapters = [n for n, p in hf.named_parameters() if p.requires_grad and ".visual." in n]
        if cfg.freeze_vision and vision_adapters:
            raise RecipeError(f"sft.lora.target_modules adapts vision-tower modules ({vision_adapters[0]}, ...) but "
                              "sft.freeze_vision is true",
                              hint="set sft.freeze_vision=false to train them, or keep the regex on language_model")
        if not cfg.freeze_vision and not vision_adapters:
            raise RecipeError("sft.freeze_vision=false with LoRA trains nothing in the vision tower: "
                              "sft.lora.target_modules adapts no vision module",
                              hint="add vision modules to sft.lora.target_modules (e.g. '.*visual.*\\.qkv'; merge "
                                   "before serving with vLLM), or keep sft.freeze_vision=true")
    if cfg.gradient_checkpointing:
        base = hf.get_base_model() if cfg.lora.enabled else hf
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # gradient_checkpointing_enable hooks every input embedding, the frozen vision tower's patch_embed too, which
        # makes autograd record, recompute and back-propagate all vision blocks (2.4x slower on the GPU,
        # gpu-baseline.md). Non-reentrant checkpointing does not need inputs that require grad: remove the hooks.
        base.disable_input_require_grads()
    n_train = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in hf.parameters())
    log(f"model {recipe.model.name}: {n_all:,} parameters, {n_train:,} trainable"
        + (" (LoRA)" if cfg.lora.enabled else "") + (", vision frozen" if cfg.freeze_vision else ""))
    return hf, bundle.processor


def compile_for_training(model, parallel: str) -> int:
    """``model.compile``: regional torch.compile of the blocks (models/compile.py); not with DeepSpeed."""
    from vigorl_cli.models.compile import compile_blocks

    if parallel == "deepspeed":
        raise RecipeError("model.compile is not supported with DeepSpeed",
                          hint="use parallel: fsdp2 or single, or set model.compile=false")
    return compile_blocks(model)


def train(recipe: Recipe, data: list[str | Path] | None = None, out: str | Path | None = None, resume: bool = True,
          log: Callable[[str], None] = print, progress_factory: Callable[[], Any] | None = None) -> dict:
    """Train ``recipe.sft`` on ``data`` (default: ``recipe.data.sft_train``) into ``out`` (default: output.dir).

    Returns the summary (also written to ``out/summary.json``). The HF folder of the final step is published at
    ``out/model``; checkpoints live under ``out/checkpoints``.
    """
    from vigorl_cli.data.io import atomic_write_json
    from vigorl_cli.train.batching import Collator, LogProbModel, rope_index_of
    from vigorl_cli.train.checkpoint import (
        latest_checkpoint,
        link_or_copy_tree,
        load_checkpoint,
        read_trainer_state,
        save_checkpoint,
    )
    from vigorl_cli.train.metrics import make_loggers
    from vigorl_cli.train.parallel import OptimConfig, setup, teardown, wrap

    cfg = recipe.sft
    out_dir = Path(out if out is not None else recipe.output.dir)
    ckpt_root = out_dir / "checkpoints"

    # ---- setup: processes, output folder ------------------------------------------------------------------------
    dist = setup(cfg.parallel)
    say = log if dist.is_main else (lambda *_: None)
    try:
        latest = latest_checkpoint(ckpt_root)
        if latest is not None and not resume:
            raise CheckpointError(f"{out_dir} already holds checkpoints (latest {latest.name})",
                                  hint="use a new --out, or drop --no-resume to continue that run")
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")

        # ---- model (same seed on every rank: LoRA init must agree), then data --------------------------------
        torch.manual_seed(recipe.seed)
        hf, processor = build_model(recipe, say)
        files = _data_files(recipe, data, "sft_train")
        if not files:
            raise RecipeError("no SFT training data", hint="pass --data FILE or set data.sft_train in the recipe")
        roots = [recipe.data_root()]
        train_data, bad_lines = load_sft_data(files, processor, roots, cfg.max_seq_len, recipe.data.max_samples,
                                              recipe.seed, say)
        val_files = _data_files(recipe, None, "sft_val") if not data else []
        val_data, _ = load_sft_data(val_files, processor, roots, cfg.max_seq_len, recipe.data.max_samples,
                                    recipe.seed, say) if val_files else (None, 0)
        examples = train_data.examples
        dropped = dict(train_data.dropped)
        say(f"data: {len(examples)} samples from {len(files)} file(s); {bad_lines} bad lines skipped; dropped "
            + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
        per_rank = cfg.micro_batch_size * cfg.grad_accum
        global_batch = per_rank * dist.world_size
        steps_per_epoch = len(examples) // global_batch
        if steps_per_epoch == 0:
            raise DataError(f"{len(examples)} usable samples, fewer than one optimizer step needs ({global_batch} = "
                            f"{cfg.micro_batch_size} per micro-batch x {cfg.grad_accum} accumulation x "
                            f"{dist.world_size} ranks)", hint="add data, or lower sft.micro_batch_size / grad_accum")
        total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, round(cfg.epochs * steps_per_epoch))

        # ---- parallel wrap, optimizer --------------------------------------------------------------------------
        model = LogProbModel(hf, chunk_size=cfg.logprob_chunk)
        if recipe.model.compile:
            say(f"model.compile: {compile_for_training(model, cfg.parallel)} blocks compiled (regional)")
        run = wrap(model, dist, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                                            bf16=bf16, grad_accum=cfg.grad_accum,
                                            micro_batch_size=cfg.micro_batch_size,
                                            deepspeed_config=cfg.deepspeed_config))
        collate = Collator(processor, hf.config, rope_index_of(hf), packing=cfg.packing,
                           fake_image_if_empty=dist.world_size > 1)

        # ---- resume ------------------------------------------------------------------------------------------
        key = _resume_key(recipe, files, len(examples))
        start_step, history = 0, []
        if latest is not None:
            saved_key = read_trainer_state(latest).get("resume_key", {})
            diff = sorted(k for k in set(key) | set(saved_key) if key.get(k) != saved_key.get(k))
            if diff:
                raise CheckpointError(f"{out_dir} was written with a different {', '.join(diff)}; resuming would "
                                      "not continue the same run", hint="use a new --out for a new run")
            state = load_checkpoint(latest, run)
            start_step, history = state["step"], state.get("losses", [])
            say(f"resumed from {latest} (step {start_step}/{total_steps})")
        else:
            torch.manual_seed(recipe.seed + dist.rank)  # dropout and other sampling differ per rank
        if dist.is_main:
            manifest = {"command": "sft", "recipe": recipe.to_dict(), "versions": _versions(), "seed": recipe.seed,
                        "data": {str(f): _file_hash(f) for f in files}, "n_examples": len(examples),
                        "dropped": dropped, "bad_lines": bad_lines, "world_size": dist.world_size,
                        "backend": dist.backend, "total_steps": total_steps, "global_batch": global_batch}
            atomic_write_json(out_dir / "manifest.json", manifest)
        logger = make_loggers(recipe.output, out_dir, dist.is_main, resume_step=start_step if latest else None,
                              config=recipe.to_dict())

        def checkpoint(step: int) -> Path:
            return save_checkpoint(ckpt_root, step, run, processor,
                                   {"resume_key": key, "losses": history,
                                    "data_position": {"epoch": step // steps_per_epoch,
                                                      "batch_in_epoch": step % steps_per_epoch}},
                                   keep_last=cfg.keep_last, hf_dtype=torch.bfloat16 if bf16 else None)

        def validation_loss() -> float | None:
            if val_data is None or not val_data.examples:
                return None
            n = len(val_data.examples) // dist.world_size
            mine = val_data.examples[dist.rank::dist.world_size][:n]  # equal count per rank: forwards are collective
            run.eval()
            nll = count = 0.0
            with torch.no_grad():
                for i in range(0, len(mine), cfg.micro_batch_size):
                    batch = collate(mine[i:i + cfg.micro_batch_size]).to(dist.device)
                    with run.autocast():
                        nll -= float(run.module(**batch.model_inputs()).sum())
                    count += batch.n_targets
            nll, count = dist.all_reduce_sum([nll, count])
            return nll / count if count else None

        # ---- the loop ----------------------------------------------------------------------------------------
        prog = progress_factory() if (progress_factory is not None and dist.is_main) else None
        task = None
        if prog is not None:
            prog.start()
            task = prog.add_task("sft", total=total_steps, completed=start_step, stats="")
        t_start = time.perf_counter()
        last_ckpt: Path | None = latest if start_step == total_steps else None
        val_loss = None
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            # data: this rank's slice of the step's global batch, as micro-batches
            idx = step_indices(len(examples), step, global_batch, recipe.seed)
            mine = idx[dist.rank * per_rank:(dist.rank + 1) * per_rank]
            micro = [[examples[i] for i in mine[k:k + cfg.micro_batch_size]]
                     for k in range(0, per_rank, cfg.micro_batch_size)]
            (n_targets,) = dist.all_reduce_sum([sum(ex.n_targets for mb in micro for ex in mb)])

            # forward / backward, accumulating gradients of this rank's share of the global mean
            run.train()
            nll_sum = tokens = 0.0
            for k, mb in enumerate(micro):
                batch = collate(mb).to(dist.device)
                with run.autocast():
                    logp = run.module(**batch.model_inputs())  # [B, L] log-prob of each target, 0 elsewhere
                nll = -logp.sum()
                run.backward(nll / n_targets, sync=k == len(micro) - 1)
                nll_sum += float(nll.detach())
                tokens += batch.n_tokens

            # update
            lr = lr_at(step, total_steps, cfg.lr, cfg.warmup_ratio)
            grad_norm = run.step(lr)

            # log
            nll_sum, tokens = dist.all_reduce_sum([nll_sum, tokens])
            loss = nll_sum / n_targets
            history.append(round(loss, 6))
            dt = time.perf_counter() - t0
            done = step + 1
            metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                       "target_tokens": int(n_targets), "tokens_per_s": tokens / dt, "step_s": dt,
                       "epoch": step / steps_per_epoch}
            if dist.device.type == "cuda":
                metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
                val_loss = validation_loss()
                metrics["val_loss"] = val_loss
            if done % max(1, cfg.log_every) == 0 or done == total_steps:
                logger.log(metrics, step=done)
            if prog is not None:
                prog.update(task, completed=done, stats=f"loss {loss:.4f}  lr {lr:.2e}  {tokens / dt:,.0f} tok/s")

            # checkpoint
            if done % cfg.save_every == 0 or done == total_steps:
                last_ckpt = checkpoint(done)

        if prog is not None:
            prog.stop()
        if start_step < total_steps or val_loss is None:
            val_loss = validation_loss()
            if val_loss is not None and start_step < total_steps:  # a re-run of a finished run logged it already
                logger.log({"val_loss": val_loss}, step=total_steps)
        logger.close()

        # ---- finish: publish the final HF folder, summary ---------------------------------------------------
        summary: dict[str, Any] = {"steps": total_steps, "resumed_from": start_step if latest else None}
        if dist.is_main:
            if last_ckpt is None:
                last_ckpt = latest_checkpoint(ckpt_root)
            link_or_copy_tree(last_ckpt, out_dir / "model")
            summary.update(final_loss=history[-1] if history else None, val_loss=val_loss,
                           checkpoint=str(last_ckpt), model_dir=str(out_dir / "model"), n_examples=len(examples),
                           dropped=dropped, bad_lines=bad_lines, train_s=round(time.perf_counter() - t_start, 2),
                           losses=history, lora=cfg.lora.enabled)
            atomic_write_json(out_dir / "summary.json", summary)
        dist.barrier()
        return summary
    finally:
        teardown(dist)


__all__ = ["build_model", "load_sft_data", "lr_at", "step_indices", "train"]
