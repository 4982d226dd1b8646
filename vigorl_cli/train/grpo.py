"""`vigorl grpo`: group relative policy optimisation, single-turn or multi-turn with the zoom tool, one function.

    vigorl grpo --recipe recipes/demo.yaml --model runs/sft/model --out runs/grpo
    vigorl grpo --recipe recipes/vstar.yaml --set tool.enabled=true --set grpo.group_size=8 --out runs/grpo-mt

Each step: **rollout** (episodes through the engine: the HF engine samples from the live policy, so no weight sync
is needed; a vLLM engine gets the new weights after every update) → **score** (the reward preset or a
``module:function`` plug-in, on the whole trajectory) → **advantages** (group-normalised) → **old / reference
log-probs** (trainer numerics; compared with the engine's log-probs every step) → **update** (dual-clip PPO over
mini-batches of ``responses_per_update``, ``ppo_epochs`` passes) → **log** → **checkpoint**. The objective and its
variants are documented in :mod:`vigorl_cli.train.losses`.

Token-exact: the trainer scores exactly the ids the engine sampled (the episode loop never re-tokenizes), with the
loss on sampled tokens only (observation turns, forced text and role headers are masked by construction).
Re-running on the same ``--out`` resumes from the last checkpoint with the same prompt order and seeds.

Batch accounting (reference §5.8): one rollout step draws ``prompts_per_step`` prompts × ``group_size`` responses;
the update walks them in mini-batches of ``responses_per_update`` (one optimizer step each), each made of
micro-batches of ``micro_batch_size``. A mini-batch's loss is the ``loss_agg`` mean over all its scored tokens (or
sequences) on all ranks: each micro-batch's mean is weighted by its count over the global count, so neither the
micro-batch size nor the number of ranks changes the update.

Multi-GPU (``grpo.parallel: fsdp2 | deepspeed`` under torchrun, HF engine): rank ``r`` rolls out prompts
``r, r + W, ...`` of the step (whole groups, so advantages stay per group) on the sharded policy, with
``HFEngine(synced_gpus=True)`` and :func:`run_episodes_synced` keeping the ranks' collective forwards in lockstep;
ranks then run the same number of optimizer steps and micro-batches (zero-weight dummies where a rank is short), and
metrics and rollouts are gathered to rank 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vigorl_cli.errors import CheckpointError, DataError, RecipeError
from vigorl_cli.recipe import Recipe


def constant_lr(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warmup over ``int(warmup_ratio * total)`` steps, then constant (the reference's GRPO schedule)."""
    warmup = int(warmup_ratio * total)
    return peak * (step + 1) / (warmup + 1) if step < warmup else peak


def prompt_indices(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Prompt indices of rollout step ``step``: consecutive slices of seeded per-epoch permutations."""
    per_epoch = max(1, n // per_step)
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()
    if n < per_step:  # tiny data sets: cycle
        return [perm[(j * per_step + k) % n] for k in range(per_step)]
    return perm[j * per_step:(j + 1) * per_step]


def load_rl_samples(files: list[Path], max_samples: int | None, seed: int, log: Callable[[str], None]):
    import random

    from vigorl_cli.data.formats import read_samples

    samples = []
    for f in files:
        sf = read_samples(f)
        for e in sf.errors[:10]:
            log(f"skipped {e}")
        got = sf.samples
        if max_samples is not None and len(got) > max_samples:
            got = list(got)
            random.Random(seed).shuffle(got)
            got = got[:max_samples]
        samples.extend(got)
    return samples


def rollout_episode_config(recipe: Recipe, multi: bool) -> Any:
    """The rollout's :class:`~vigorl_cli.agent.episode.EpisodeConfig`: sampling from ``grpo.sampling``, the zoom tool,
    turn/image limits and observation text from ``tool`` (unset keys: ``recipe.TOOL_DEFAULTS``)."""
    from vigorl_cli.agent.episode import EpisodeConfig
    from vigorl_cli.engines.base import SamplingParams

    g = recipe.grpo
    sampling = SamplingParams.from_config(g.sampling, n=1, stop=rollout_stops(g.sampling.stop, multi))
    return EpisodeConfig(sampling=sampling, multiturn=multi,
                         zoom=recipe.tool.zoom() if multi else None, max_turns=recipe.tool.value("max_turns"),
                         max_images=recipe.tool.value("max_images"), max_response_tokens=g.max_response_len,
                         observation_style=recipe.tool.style())


def build_policy(recipe: Recipe, model: str | None, log: Callable[[str], None]):
    """The trainable policy (fp32 master weights), its processor, and a frozen reference copy when KL is used."""
    from vigorl_cli.models.load import load_model

    g = recipe.grpo
    name = model or recipe.model.name
    kw = dict(dtype="float32", attn_implementation=recipe.model.attn_implementation, device="cpu",
              min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels, revision=recipe.model.revision,
              trust_remote_code=recipe.model.trust_remote_code, vision_attention=recipe.model.vision_attention)
    bundle = load_model(name, **kw)
    hf = bundle.model
    if g.freeze_vision:
        for p in hf.model.visual.parameters():
            p.requires_grad_(False)
    if g.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.disable_input_require_grads()  # keep autograd out of the frozen vision tower (gpu-baseline.md)
    ref = None
    if g.kl_coef != 0.0:
        ref = load_model(name, **kw).model
        ref.requires_grad_(False)
        ref.eval()
    n_train = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    log(f"policy {name}: {sum(p.numel() for p in hf.parameters()):,} parameters, {n_train:,} trainable"
        + (", frozen reference for KL" if ref is not None else ""))
    return hf, bundle.processor, ref, name


def _rows(batch, values: torch.Tensor, pad: float | int | bool = 0) -> torch.Tensor:
    """Per-token values in one row per example ``[B, L]``: a packed batch's ``[1, T]`` is split per example and
    right-padded with ``pad`` (differentiable); a padded batch's values are returned as they are. The loss math
    (sequence aggregation, GSPO ratios, in-reward KL) works on rows = sequences."""
    if not batch.packed:
        return values
    return torch.nn.utils.rnn.pad_sequence(batch.per_example(values), batch_first=True, padding_value=pad)


def rollout_copy(hf: torch.nn.Module, dtype: torch.dtype, compile_options: dict | None = None) -> torch.nn.Module:
    """A frozen ``dtype`` copy of the policy for the HF engine (``engine.static_cache`` on a GPU).

    The trainer keeps fp32 master weights and computes under bf16 autocast. Rolling out on them under autocast casts
    every weight at every decode step, and a static KV cache cannot hold autocast's mixed outputs (keys leave the
    fp32 rotary embedding in fp32, values leave v_proj in bf16). The copy is plain bf16, as a vLLM engine's weights
    are; :func:`sync_rollout_copy` refreshes it after every update. Engine and trainer log-probs then differ by the
    bf16-vs-autocast numerics, which the logged ``logprob_diff_engine_vs_trainer`` shows (``grpo.tis_cap`` corrects
    for it). ``compile_options`` (``model.compile``): the copy's norms and MLPs get a regional compile of their own,
    which the static decode loop's CUDA graph then replays (16% faster decode in ``rollout_decode.py``)."""
    import copy

    from vigorl_cli.models.compile import uncompile
    from vigorl_cli.models.packed_attention import uninstall_packed_attention

    shadow = copy.deepcopy(hf).to(dtype)
    uncompile(shadow)  # the trainer's compiled functions are bound to the trainer's modules
    uninstall_packed_attention(shadow)  # plain sdpa
    shadow.requires_grad_(False)
    shadow.eval()
    if compile_options is not None:
        from vigorl_cli.models.compile import compile_blocks

        compile_blocks(shadow, **compile_options)
    return shadow


@torch.no_grad()
def sync_rollout_copy(shadow: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Copy the policy's current weights into its rollout copy (in place: compiled graphs keep their buffers)."""
    src = dict(hf.named_parameters())
    for name, p in shadow.named_parameters():
        p.copy_(src[name])


def _per_token(batch, per_example: list[torch.Tensor | float]) -> torch.Tensor:
    """Scatter one value (scalar) or one vector (over the example's scored positions) per example into the row
    layout of :func:`_rows` ``[B, L]``, at the scored positions."""
    from vigorl_cli.train.batching import IGNORE

    scored = (_rows(batch, batch.targets, IGNORE) != IGNORE).cpu()  # [B, L]
    out = torch.zeros(scored.shape, dtype=torch.float32)
    for i, (n, v) in enumerate(zip(batch.seq_lens, per_example)):
        m = scored[i, :n]
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            vals = torch.zeros(n)
            vals[m] = v[: int(m.sum())].float()
            out[i, :n] = vals
        else:
            out[i, :n] = torch.where(m, torch.tensor(float(v)), torch.tensor(0.0))
    return out


def _expanded_example(ep, processor, image_token_id: int, sid: str):
    """Episode → training Example: placeholders expanded by each image's grid, loss on sampled tokens."""
    from vigorl_cli.train.batching import Example, image_token_count

    counts = iter([image_token_count(processor, si.image.size) for si in ep.images])
    ids, mask = [], []
    for t, m in zip(ep.prompt_ids, ep.loss_mask()):
        if t == image_token_id:
            k = next(counts)
            ids.extend([t] * k)
            mask.extend([0] * k)
        else:
            ids.append(t)
            mask.append(m)
    return Example.from_ids(sid, ids, [bool(m) for m in mask], [si.image for si in ep.images], image_token_id)


def train(recipe: Recipe, model: str | None = None, data: list[str | Path] | None = None,
          out: str | Path | None = None, resume: bool = True, log: Callable[[str], None] = print,
          progress_factory: Callable[[], Any] | None = None,
          reward_fn: Callable[[Any], dict[str, float]] | None = None) -> dict:
    """Run ``recipe.grpo``; returns the summary (also ``out/summary.json``). The final HF folder is ``out/model``."""
    from vigorl_cli.agent.episode import Episode, run_episodes
    from vigorl_cli.agent.images import load_for_model
    from vigorl_cli.data.io import atomic_write_json
    from vigorl_cli.data.schema import Target
    from vigorl_cli.engines.base import derive_seed
    from vigorl_cli.models import prompts
    from vigorl_cli.models.compile import compile_blocks, eager
    from vigorl_cli.models.load import ModelBundle, model_kind
    from vigorl_cli.rewards.presets import RewardInput, build_reward
    from vigorl_cli.train.batching import IGNORE, Collator, LogProbModel, rope_index_of
    from vigorl_cli.train.checkpoint import (latest_checkpoint, link_or_copy_tree, load_checkpoint,
                                             save_checkpoint)
    from vigorl_cli.train.losses import (aggregate, group_advantages, informative_groups, kl_estimate,
                                         kl_penalised_rewards, masked_entropy_from_logp, policy_loss)
    from vigorl_cli.train.metrics import make_loggers
    from vigorl_cli.train.parallel import OptimConfig, setup, teardown, wrap

    g = recipe.grpo
    out_dir = Path(out if out is not None else recipe.output.dir)
    ckpt_root = out_dir / "checkpoints"
    # ---- setup: process, model, data, engine ----------------------------------------------------------------
    dist = setup(g.parallel)
    engine = None
    say = log if dist.is_main else (lambda *_: None)
    synced = dist.world_size > 1  # a sharded policy: generation and every forward are collective
    try:
        if synced and recipe.engine.backend == "vllm":
            raise RecipeError(f"engine.backend=vllm with grpo.parallel={g.parallel} on {dist.world_size} ranks is not "
                              "supported yet", hint="--set engine.backend=hf (rolls out on the sharded policy)")
        latest = latest_checkpoint(ckpt_root)
        if latest is not None and not resume:
            raise CheckpointError(f"{out_dir} already holds checkpoints (latest {latest.name})",
                                  hint="use a new --out, or drop --no-resume to continue that run")
        out_dir.mkdir(parents=True, exist_ok=True)
        bf16 = dist.device.type == "cuda"
        torch.manual_seed(recipe.seed)
        hf, processor, ref, model_name = build_policy(recipe, model, say)
        files = [Path(p) for p in data] if data else [recipe.data_root() / f for f in recipe.data.rl_train]
        if not files:
            raise RecipeError("no GRPO training data", hint="pass --data FILE or set data.rl_train in the recipe")
        samples = load_rl_samples(files, recipe.data.max_samples, recipe.seed, say)
        if not samples:
            raise DataError(f"no usable samples in {', '.join(map(str, files))}")
        roots = [recipe.data_root(), *{f.parent for f in files}]
        val_files = [recipe.data_root() / f for f in recipe.data.rl_val] if g.val_every > 0 else []
        val_samples = load_rl_samples(val_files, recipe.data.max_samples, recipe.seed, say) if val_files else []
        if val_files and not val_samples:
            raise DataError(f"no usable validation samples in {', '.join(map(str, val_files))}",
                            hint="fix data.rl_val or set grpo.val_every=0")
        val_roots = [recipe.data_root(), *{f.parent for f in val_files}]
        policy = LogProbModel(hf)
        if recipe.model.compile:
            from vigorl_cli.train.sft import compile_for_training

            say(f"model.compile: {compile_for_training(policy, g.parallel)} policy blocks compiled (regional; the "
                "HF engine's bf16 rollout copy gets its own, otherwise rollouts run eager)")
        run = wrap(policy, dist, OptimConfig(lr=g.lr, weight_decay=g.weight_decay,
                                                       max_grad_norm=g.max_grad_norm, bf16=bf16))
        collate = Collator(processor, hf.config, rope_index_of(hf), packing=g.packing, fake_image_if_empty=synced)
        if ref is not None:
            ref = ref.to(dist.device, dtype=torch.bfloat16 if bf16 else torch.float32)
            ref_lp = LogProbModel(ref)
            if recipe.model.compile:
                compile_blocks(ref_lp)
        multi = recipe.tool.enabled
        reward = reward_fn or build_reward(recipe.reward, multiturn=multi)
        backend = recipe.engine.backend
        shadow = None  # a bf16 copy of the policy that rolls out (engine.static_cache on a GPU)
        static = recipe.engine.static_cache or recipe.engine.continuous_batching
        if backend == "hf" and recipe.engine.continuous_batching and g.parallel != "single":
            raise RecipeError("engine.continuous_batching runs in a single process (parallel: single); use "
                              "engine.static_cache or the vllm engine under torchrun")
        if backend == "hf" and static and bf16 and g.parallel == "single":
            shadow = rollout_copy(hf, torch.bfloat16, compile_options={} if recipe.model.compile else None)
        if backend == "hf":
            from vigorl_cli.engines.factory import hf_engine

            # kind = the model family (not a role name): image sharing and the static decode loop key on it
            bundle = ModelBundle(shadow if shadow is not None else hf, processor, model_name, model_kind(hf.config))
            kw = {"autocast_dtype": torch.bfloat16 if bf16 and shadow is None else None}
            if not recipe.engine.continuous_batching:
                # FSDP2 / ZeRO-3: generate through the wrapped root's forward (its parameters are gathered around it)
                kw.update(synced_gpus=synced,
                          generate_fn=(lambda **k: run.module(generate=k)) if g.parallel != "single" else None)
            engine = hf_engine(bundle, recipe.engine, seed=recipe.seed,
                               cache_len=recipe.grpo.max_prompt_len + recipe.grpo.max_response_len, **kw)
        elif backend == "vllm":
            from vigorl_cli.engines.vllm import VLLMEngine

            # the engine's numerics follow the trainer's (fp32 master weights on CPU, bf16 compute on GPU), so that
            # engine and trainer log-probs agree; vLLM's "auto" would pick bfloat16 on vLLM-CPU
            vdtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if bf16 else "float32")
            engine = VLLMEngine(str(model_name), dtype=vdtype, seed=recipe.seed,
                                tensor_parallel_size=recipe.engine.tensor_parallel_size,
                                gpu_memory_utilization=recipe.engine.gpu_memory_utilization,
                                max_model_len=recipe.engine.max_model_len, enforce_eager=recipe.engine.enforce_eager,
                                min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels,
                                limit_images=recipe.tool.value("max_images"), no_barrier=recipe.engine.no_barrier,
                                enable_sleep_mode=(recipe.engine.sleep_mode if recipe.engine.sleep_mode is not None
                                                   else torch.cuda.is_available()))
        else:
            raise RecipeError("grpo rolls out with the hf or vllm engine (the policy changes every step)",
                              hint="--set engine.backend=hf")
        system = recipe.prompt.system or prompts.system_prompt(recipe.prompt.preset,
                                                               "multiturn" if multi else "single",
                                                               literal_newlines=recipe.prompt.literal_newlines)
        ep_cfg = rollout_episode_config(recipe, multi)
        image_token_id = hf.config.image_token_id
        val_cfg = dataclasses.replace(ep_cfg, sampling=dataclasses.replace(ep_cfg.sampling,
                                                                           temperature=g.val_temperature))
        image_cache: dict[tuple, tuple] = {}  # (roots searched, sample id) -> load_for_model's result

        def load_image(s, where: list[Path]):
            """``(original, frame, shown)`` of the sample's image (cached), or None when it cannot be loaded."""
            key = (tuple(where), s.id)
            try:
                if key not in image_cache:
                    path = s.image_paths(where[0])[0]
                    if not path.exists():
                        path = next((Path(r) / s.images[0] for r in where if (Path(r) / s.images[0]).exists()),
                                    path)
                    image_cache[key] = load_for_model(path, processor)
                return image_cache[key]
            except (OSError, ValueError, IndexError):
                return None

        def score(ep) -> dict[str, float]:
            gt = None
            s = ep.sample
            if s.target is not None and (s.target.box is not None or s.target.point is not None):
                f = ep.images[0].frame  # judges compare in the frame the model saw
                gt = Target(box=f.box_from_original(s.target.box, exact=True), frame="shown") \
                    if s.target.box is not None else \
                    Target(point=f.from_original(s.target.point, exact=True, check=False), frame="shown")
            inp = RewardInput(response=ep.turn_texts if multi else (ep.turn_texts[-1] if ep.turn_texts else ""),
                              sample=s, gt=gt, tool_points=[tuple(c["point"]) for c in ep.crops],
                              image_size=ep.images[0].image.size)
            r = reward(inp)
            return r if isinstance(r, dict) else {"overall": float(r)}

        def roll(eps: list) -> None:
            """Run episodes to completion with the current policy (ranks in lockstep when the model is sharded)."""
            with torch.no_grad(), eager(hf):  # compiled blocks (model.compile) are for the trainer's shapes
                if synced:
                    run_episodes_synced(engine, eps, dist)
                else:
                    run_episodes(engine, eps)

        def validate(step_no: int) -> dict[str, float]:
            """One episode per data.rl_val sample with the current policy: mean reward and accuracy (all ranks)."""
            eps, failed = [], 0
            for i, s in enumerate(val_samples):
                if i % dist.world_size != dist.rank:
                    continue
                loaded = load_image(s, val_roots)
                if loaded is None:
                    failed += 1
                    continue
                original, frame, shown = loaded
                eps.append(Episode(s, shown, frame, system, processor, val_cfg,
                                   seed=derive_seed(recipe.seed, "grpo-val", step_no), draw=0, original=original))
            run.eval()
            roll(eps)
            vparts = [score(ep) for ep in eps]
            sums = [sum(p["overall"] for p in vparts), sum(p.get("accuracy", p["overall"]) for p in vparts),
                    float(len(eps)), float(failed)]
            if synced:
                sums = dist.all_reduce_sum(sums)
            n = max(1.0, sums[2])
            return {"val/reward": sums[0] / n, "val/accuracy": sums[1] / n, "val/n": int(sums[2]),
                    "val/image_failures": int(sums[3])}

        # ---- resume ----------------------------------------------------------------------------------------
        start, history = 0, []
        if latest is not None:
            state = load_checkpoint(latest, run)
            start, history = state["step"], state.get("rewards", [])
            say(f"resumed from {latest} (step {start}/{g.steps})")
            if backend == "vllm":
                engine.update_weights(run.full_state_dict())
            if shadow is not None:
                sync_rollout_copy(shadow, hf)
        if dist.is_main:
            atomic_write_json(out_dir / "manifest.json", {"command": "grpo", "recipe": recipe.to_dict(),
                                                          "model": str(model_name), "n_prompts": len(samples),
                                                          "data": [str(f) for f in files], "backend": dist.backend,
                                                          "world_size": dist.world_size})
        logger = make_loggers(recipe.output, out_dir, dist.is_main, resume_step=start if latest else None,
                              config=recipe.to_dict())
        prog = progress_factory() if (progress_factory is not None and dist.is_main) else None
        task = None
        if prog is not None:
            prog.start()
            task = prog.add_task("grpo", total=g.steps, completed=start, stats="")
        last_ckpt = latest if start >= g.steps else None
        val_history: list[dict] = []
        t_run = time.perf_counter()

        for step in range(start, g.steps):
            timing: dict[str, float] = {}
            stats: dict[str, list[float]] = defaultdict(list)
            # ---- 1. rollout: group_size episodes per prompt --------------------------------------------------
            t0 = time.perf_counter()
            run.eval()
            idx = prompt_indices(len(samples), step, g.prompts_per_step, recipe.seed)
            episodes, groups, image_failures, too_long = [], [], 0, 0
            for gi, i in enumerate(idx):
                if gi % dist.world_size != dist.rank:  # whole prompts (groups) per rank, interleaved
                    continue
                s = samples[i]
                loaded = load_image(s, roots)
                if loaded is None:
                    image_failures += 1
                    continue
                original, frame, shown = loaded
                seed = derive_seed(recipe.seed, "grpo", step)
                group = [Episode(s, shown, frame, system, processor, ep_cfg, seed=seed, draw=k, original=original)
                         for k in range(g.group_size)]
                if prompt_tokens(group[0], processor) > g.max_prompt_len:  # dropped, counted (reference: filtered)
                    too_long += 1
                    continue
                episodes.extend(group)
                groups.extend([gi] * g.group_size)
            n_eps, image_failures, too_long = (int(v) for v in dist.all_reduce_sum([len(episodes), image_failures,
                                                                                     too_long]))
            if not n_eps:
                if not too_long:
                    raise DataError("no prompt of this step could be loaded (all images failed)")
                say(f"step {step + 1}: skipped, every prompt is longer than grpo.max_prompt_len={g.max_prompt_len} "
                    f"tokens ({too_long} dropped, {image_failures} image failures)")
                history.append(None)
                logger.log({"skipped": 1, "prompts_dropped_too_long": too_long, "image_failures": image_failures,
                            "lr": constant_lr(step, g.steps, g.lr, g.warmup_ratio),
                            "rollout_s": time.perf_counter() - t0}, step=step + 1)
                if prog is not None:
                    prog.update(task, completed=step + 1, stats="skipped: prompts too long")
                if (step + 1) % g.save_every == 0 or step + 1 == g.steps:
                    last_ckpt = save_checkpoint(ckpt_root, step + 1, run, processor, {"rewards": history},
                                                keep_last=g.keep_last, hf_dtype=torch.bfloat16 if bf16 else None)
                continue
            roll(episodes)
            timing["rollout_s"] = time.perf_counter() - t0
            if backend == "vllm":  # colocated: free the engine's GPU memory for the update (no-op without sleep mode)
                engine.sleep(recipe.engine.sleep_level)

            # ---- 2. score ---------------------------------------------------------------------------------
            t0 = time.perf_counter()
            parts = [score(ep) for ep in episodes]
            rewards = torch.tensor([p["overall"] for p in parts], dtype=torch.float32)
            truncated = torch.tensor([is_truncated(ep) for ep in episodes], dtype=torch.bool)
            rewards, keep = apply_truncation_policy(rewards, truncated, g.truncated)  # [N], [N]
            gids = torch.tensor(groups, dtype=torch.long)
            if g.filter_equal_groups:  # on the task rewards (a KL penalty would make every group informative)
                keep &= informative_groups(rewards, gids)
            timing["reward_s"] = time.perf_counter() - t0

            # ---- 3. training examples, old and reference log-probs, advantages --------------------------------
            t0 = time.perf_counter()
            items = []  # (example, episode index, engine log-probs)
            for i, ep in enumerate(episodes):
                if not bool(keep[i]) or sum(ep.loss_mask()) == 0:
                    continue
                ex = _expanded_example(ep, processor, image_token_id, f"{ep.sample.id}#{ep.draw}")
                eng_lp = [v for sgm in ep.segments if sgm.kind == "sampled" for v in (sgm.logprobs or [])]
                items.append((ex, i, torch.tensor(eng_lp) if eng_lp else None))
            # The plan: optimizer steps of responses_per_update responses (over all ranks), each of micro-batches.
            # Ranks run the same number of optimizer steps and of micro-batches in each (every forward/backward of a
            # sharded model is collective); a rank short of data runs a dummy micro-batch with zero weight.
            per_update = max(1, g.responses_per_update // dist.world_size)  # responses per rank per optimizer step
            chunks = [items[k:k + per_update] for k in range(0, len(items), per_update)]
            (n_updates,) = dist.all_reduce_max([len(chunks)])
            chunks += [[] for _ in range(int(n_updates) - len(chunks))]
            plan = [[c[k:k + g.micro_batch_size] for k in range(0, len(c), g.micro_batch_size)] for c in chunks]
            n_micro = dist.all_reduce_max([len(c) for c in plan]) if plan else []
            plan = [c + [None] * (int(n) - len(c)) for c, n in zip(plan, n_micro)]
            # prepared micro-batch: [batch, episode indices (None: dummy), old, ref, engine log-probs, mask, count];
            # the episode indices are replaced by the per-token advantages once these are known
            prepared: list[list[list]] = []
            diff_sum = diff_n = 0.0
            with torch.no_grad():
                # pass 1: old log-probs (trainer numerics, before the update), compared with the engine's
                for chunk in plan:
                    prepared.append([])
                    for mb in chunk:
                        if mb is None:  # this rank's share is used up: forward (collective) with nothing scored
                            batch = collate([_dummy_example(collate, processor)]).to(dist.device)
                            with run.autocast():
                                run.module(**batch.model_inputs())
                            prepared[-1].append([batch, None, None, None, None, None, 0.0])
                            continue
                        batch = collate([ex for ex, _, _ in mb]).to(dist.device)
                        with run.autocast():
                            old = _rows(batch, run.module(**batch.model_inputs()).float())  # [B, L]
                        mask = _rows(batch, batch.targets, IGNORE) != IGNORE
                        engine_lp = None
                        if all(e is not None for _, _, e in mb):
                            engine_lp = _per_token(batch, [e for _, _, e in mb]).to(dist.device)
                            diff_sum += float(((old - engine_lp).abs() * mask).sum())
                            diff_n += int(mask.sum())
                        prepared[-1].append([batch, [i for _, i, _ in mb], old, None, engine_lp, mask,
                                             _agg_count(mask, g.loss_agg)])
                _sync(dist.device)
                timing["old_logprob_s"] = time.perf_counter() - t0
                # pass 2: reference log-probs (the frozen reference is a full copy on every rank: no collectives)
                t0 = time.perf_counter()
                kl_pen = torch.zeros(len(episodes))  # [N] kl_coef·Σ_t kl_t subtracted from the reward (kl_in=reward)
                for x in (x for c in prepared for x in c if x[1] is not None and ref is not None):
                    batch, idx_mb, old, _, _, mask, _ = x
                    with run.autocast():
                        x[3] = refl = _rows(batch, ref_lp(**batch.model_inputs()).float())  # [B, L]
                    if g.kl_in == "reward":
                        # verl/EasyR1 in-reward KL: token rewards minus kl_coef·kl_t (the task reward sits on the
                        # last token), summed over the response: the sequence reward loses kl_coef·Σ_t kl_t
                        per_tok = -kl_penalised_rewards(torch.zeros_like(old), old, refl, mask, g.kl_coef,
                                                        g.kl_estimator)  # [B, L]
                        kl_pen[torch.tensor(idx_mb)] = per_tok.sum(dim=-1).cpu()
                        stats["kl"].append(float(aggregate(kl_estimate(old, refl, g.kl_estimator), mask, g.loss_agg)))
                _sync(dist.device)
                timing["ref_logprob_s"] = time.perf_counter() - t0
            timing["logprob_s"] = timing["old_logprob_s"] + timing["ref_logprob_s"]
            # advantages: per prompt group, from the task rewards (minus the KL penalty with kl_in=reward)
            adv = group_advantages(rewards - kl_pen, gids, g.adv_norm)  # [N]
            for x in (x for c in prepared for x in c if x[1] is not None):
                x[1] = _per_token(x[0], [float(adv[i]) for i in x[1]]).to(dist.device)
            # normaliser of each optimizer step: its scored tokens (token_mean) or sequences, over all ranks, so that
            # the update does not depend on the number of ranks or micro-batches
            totals = dist.all_reduce_sum([sum(x[-1] for x in c) for c in prepared]) if prepared else []
            diff_sum, diff_n = dist.all_reduce_sum([diff_sum, diff_n])

            # ---- 4. update: mini-batches of responses_per_update, micro-batches within ---------------------------
            t0 = time.perf_counter()
            run.train()
            lr = constant_lr(step, g.steps, g.lr, g.warmup_ratio)
            step_losses: list[float] = []
            for _ in range(g.ppo_epochs):
                for chunk, total in zip(prepared, totals):
                    loss_sum = 0.0
                    for k, (batch, adv_tok, old, refl, engine_lp, mask, count) in enumerate(chunk):
                        last = k == len(chunk) - 1
                        if adv_tok is None:  # dummy: collective forward/backward, zero gradient
                            with run.autocast():
                                logp = run.module(**batch.model_inputs()).float()
                            run.backward(logp.sum() * 0.0, sync=last)
                            continue
                        with run.autocast():
                            logp = _rows(batch, run.module(**batch.model_inputs()).float())  # [B, L]
                        out_l = policy_loss(logp, old, adv_tok, mask, clip_low=g.clip_low, clip_high=g.clip_high,
                                            clip_dual=g.clip_dual, objective=g.objective, loss_agg=g.loss_agg,
                                            ref_logp=refl, kl_coef=g.kl_coef if g.kl_in == "loss" else 0.0,
                                            kl_estimator=g.kl_estimator, engine_logp=engine_lp, tis_cap=g.tis_cap)
                        # the micro-batch's mean times its share of the optimizer step's global count
                        loss = out_l.loss * (count / max(1.0, total))
                        run.backward(loss, sync=last)
                        loss_sum += float(loss.detach())
                        stats["pg_loss"].append(float(out_l.pg_loss))
                        if g.kl_in == "loss":
                            stats["kl"].append(float(out_l.kl))
                        stats["clip_frac"].append(out_l.clip_frac)
                        stats["dual_clip_frac"].append(out_l.dual_clip_frac)
                        stats["entropy"].append(masked_entropy_from_logp(logp.detach(), mask))
                    stats["grad_norm"].append(run.step(lr))
                    step_losses.append(loss_sum)
            step_losses = dist.all_reduce_sum(step_losses) if step_losses else []
            timing["update_s"] = time.perf_counter() - t0
            if backend == "vllm":
                t0 = time.perf_counter()
                engine.wake_up()
                engine.update_weights(run.full_state_dict())
                timing["sync_s"] = time.perf_counter() - t0
            if shadow is not None:
                t0 = time.perf_counter()
                sync_rollout_copy(shadow, hf)
                _sync(dist.device)
                timing["sync_s"] = time.perf_counter() - t0

            # ---- 5. log (over all ranks; episodes in prompt order, as one process has them) --------------------
            tr = truncated.tolist()
            infos = [{"group": groups[i], "draw": ep.draw, "reward": float(rewards[i]), "parts": parts[i],
                      "tokens": ep.n_tokens(), "turns": ep.turns, "crops": len(ep.crops),
                      "uniq": len({tuple(c["point"]) for c in ep.crops}) / len(ep.crops) if ep.crops else None,
                      "truncated": bool(tr[i]), "failures": list(ep.failures), "record": rec,
                      "kl_penalty": float(kl_pen[i])}
                     for i, (ep, rec) in enumerate(zip(episodes, _rollout_records(episodes, parts)))]
            stat_sums = {k: (sum(v), len(v)) for k, v in stats.items()}
            n_items = len(items)
            if synced:
                gathered = dist.all_gather_object((infos, stat_sums, n_items))
                infos = sorted((x for gg in gathered for x in gg[0]), key=lambda x: (x["group"], x["draw"]))
                stat_sums = {k: (sum(gg[1].get(k, (0.0, 0))[0] for gg in gathered),
                                 sum(gg[1].get(k, (0.0, 0))[1] for gg in gathered))
                             for k in sorted({k for gg in gathered for k in gg[1]})}
                n_items = sum(gg[2] for gg in gathered)
            rw = torch.tensor([x["reward"] for x in infos], dtype=torch.float32)
            n_tok = [x["tokens"] for x in infos]
            uniq = [x["uniq"] for x in infos if x["uniq"] is not None]
            m = {"reward": float(rw.mean()), "reward_std": float(rw.std()) if len(rw) > 1 else 0.0,
                 **{f"reward/{k}": mean([x["parts"].get(k, 0.0) for x in infos])
                    for k in ("accuracy", "format", "grounding", "diversity")},
                 "response_tokens": mean(n_tok), "turns": mean([x["turns"] for x in infos]),
                 "crops": mean([x["crops"] for x in infos]), "unique_crop_ratio": mean(uniq) if uniq else None,
                 "truncated_frac": mean([float(x["truncated"]) for x in infos]),
                 "trained_frac": n_items / len(infos), "image_failures": int(image_failures),
                 "prompts_dropped_too_long": too_long, "lr": lr,
                 "loss": mean(step_losses) if step_losses else None,
                 **{k: sm / max(1, n) for k, (sm, n) in stat_sums.items()},
                 "logprob_diff_engine_vs_trainer": diff_sum / diff_n if diff_n else None,
                 **timing, "tokens_per_s": sum(n_tok) / max(1e-9, timing["rollout_s"])}
            if g.kl_in == "reward" and ref is not None:
                m["kl_reward_penalty"] = mean([x["kl_penalty"] for x in infos])  # mean over responses
            if synced:
                m["world_size"] = dist.world_size
            fails = Counter(f for x in infos for f in x["failures"])
            m.update({f"failure/{k}": v / len(infos) for k, v in fails.items()})
            if val_samples and ((step + 1) % g.val_every == 0 or step + 1 == g.steps):
                t0 = time.perf_counter()
                m.update(validate(step + 1))
                m["val_s"] = time.perf_counter() - t0
                val_history.append({"step": step + 1, "accuracy": round(m["val/accuracy"], 6),
                                    "reward": round(m["val/reward"], 6)})
            history.append(round(m["reward"], 6))
            logger.log(m, step=step + 1)
            if dist.is_main:
                from vigorl_cli.data.io import write_jsonl

                write_jsonl(out_dir / "rollouts" / f"step_{step + 1:06d}.jsonl", [x["record"] for x in infos])
            if prog is not None:
                prog.update(task, completed=step + 1, stats=f"reward {m['reward']:.3f}  kl {m.get('kl', 0):.4f}  "
                                                            f"{m['tokens_per_s']:,.0f} tok/s")

            # ---- 6. checkpoint -------------------------------------------------------------------------------
            if (step + 1) % g.save_every == 0 or step + 1 == g.steps:
                last_ckpt = save_checkpoint(ckpt_root, step + 1, run, processor, {"rewards": history},
                                            keep_last=g.keep_last, hf_dtype=torch.bfloat16 if bf16 else None)
        if prog is not None:
            prog.stop()
        logger.close()
        summary: dict[str, Any] = {"steps": g.steps, "resumed_from": start if latest else None, "rewards": history,
                                   "final_reward": history[-1] if history else None}
        if val_samples:
            summary["val"] = val_history  # this process's passes (a resumed run: those after the resume)
        if dist.is_main:  # other ranks return no model_dir (the CLI prints nothing for them)
            if last_ckpt is None:
                last_ckpt = latest_checkpoint(ckpt_root)
            link_or_copy_tree(last_ckpt, out_dir / "model")
            summary.update(model_dir=str(out_dir / "model"), checkpoint=str(last_ckpt),
                           train_s=round(time.perf_counter() - t_run, 2), n_prompts=len(samples),
                           world_size=dist.world_size,
                           data_root=str(recipe.data_root().resolve()))  # `vigorl view OUT/rollouts` finds images
            atomic_write_json(out_dir / "summary.json", summary)
        dist.barrier()
        return summary
    finally:
        if engine is not None:
            engine.close()  # vLLM: stops its engine-core and worker processes, removes the weight-sync folder
        teardown(dist)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_episodes_synced(engine: Any, episodes: list, dist) -> None:
    """:func:`~vigorl_cli.agent.episode.run_episodes` for a policy sharded over ranks (``HFEngine(synced_gpus=True)``).

    Every rank calls ``engine.generate`` once per round, with the pending turns of its own live episodes (possibly
    none: the engine then runs dummy batches alongside the other ranks), until an all-reduce says that no rank has a
    live episode left. Episodes are multi-turn or single-turn alike."""
    from vigorl_cli.engines.base import Completion

    live = [e for e in episodes if not e.done]
    while True:
        (n_live,) = dist.all_reduce_sum([len(live)])
        if n_live == 0:
            return
        results = engine.generate([e.request() for e in live])
        for e, comps in zip(live, results):
            e.feed(comps[0] if comps else Completion([], "", None, "error", error="no completion"))
        live = [e for e in live if not e.done]


def rollout_stops(user: list[str] | tuple[str, ...], multiturn: bool) -> tuple[str, ...]:
    """Stop strings of every rollout turn: multi-turn always stops at ``</tool_call>``, ``</answer>``,
    ``<|im_end|>`` (the episode loop needs them); ``grpo.sampling.stop`` adds to them, never replaces them."""
    from vigorl_cli.agent.episode import MULTITURN_STOP

    out = list(MULTITURN_STOP) if multiturn else []
    out += [s for s in user if s and s not in out]
    return tuple(out)


def prompt_tokens(ep, processor) -> int:
    """Tokens of an episode's prompt as the model sees it: each image placeholder expanded by the image's grid."""
    from vigorl_cli.train.batching import image_token_count

    return len(ep.prompt_ids) + sum(image_token_count(processor, si.image.size) - 1 for si in ep.images)


def is_truncated(ep) -> bool:
    """A trajectory cut by a limit: it does not end with ``<|im_end|>`` (a turn ran out of tokens), or the episode's
    response budget ended it (reference: "samples not ending in an EOS token")."""
    return (not ep.ends_with_eos) or ep.finish == "budget"


def apply_truncation_policy(rewards: torch.Tensor, truncated: torch.Tensor,
                            policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``grpo.truncated`` on a step's rewards ``[N]`` and truncation flags ``[N]`` (bool): (rewards, in loss ``[N]``).

    ``mask``: a truncated trajectory keeps its reward (it still counts in its group's mean and std) but is left out
    of the loss (the reference zeroes its response mask); ``penalize``: its reward becomes 0 and it is trained on;
    ``keep``: nothing changes."""
    keep = torch.ones_like(truncated, dtype=torch.bool)
    if policy == "penalize":
        rewards = torch.where(truncated, torch.zeros_like(rewards), rewards)
    elif policy == "mask":
        keep = ~truncated
    elif policy != "keep":
        raise ValueError(f"unknown grpo.truncated policy {policy!r}; use mask, penalize or keep")
    return rewards, keep


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a phase's wall time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _agg_count(mask: torch.Tensor, loss_agg: str) -> float:
    """What a micro-batch's aggregated loss is a mean over: scored tokens (token_mean) or scored sequences."""
    if loss_agg == "token_mean":
        return float(mask.sum())
    return float((mask.sum(dim=-1) > 0).sum())


def _dummy_example(collate, processor):
    """A blank-image segment plus two tokens (one scored): a micro-batch for a rank that has run out of data (its
    loss is multiplied by 0; the forward and backward still run every sharded module, as the other ranks' do)."""
    from vigorl_cli.train.batching import Example

    fake = collate.fake_image_example()
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = list(fake.input_ids) + [end, end]
    return Example.from_ids("dummy", ids, [False] * (len(ids) - 1) + [True], fake.images, collate.image_token_id)


def _rollout_records(episodes: list, parts: list[dict]) -> list[dict]:
    """One record per trajectory, in the eval record shape (so `vigorl view` shows rollouts too)."""
    recs = []
    for ep, p in zip(episodes, parts):
        s = ep.sample
        recs.append({"key": f"{s.id}#{ep.draw}", "id": s.id, "draw": ep.draw, "split": "rollout",
                     "question": s.question, "gt": s.answer, "pred": ep.answer, "score": p.get("accuracy", 0.0),
                     "reward": p, "failure": ep.failures[0] if ep.failures else None, "failures": ep.failures,
                     **ep.to_record(), "frame": ep.images[0].frame.to_dict(),
                     "image": s.images[0] if s.images else None})
    return recs

