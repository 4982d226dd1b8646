"""One GRPO step of ours beside TRL's ``GRPOTrainer``, same config, same process, same device.

Both sides train the same model folder (a Qwen2.5-VL-3B-shaped random model from ``build_shaped``, or ``--tiny``)
on the same prompts (the demo V*-like RL data with their images, in the same order: step k of both sides sees the
same ``--prompts`` prompts), with the same group size, max new tokens, temperature / top-p, lr (constant), weight
decay, grad-norm clip, clip range (0.2 / 0.28), KL coefficient (k3, frozen reference, bf16 on GPU), reward (our
preset, wrapped as a TRL reward function), gradient checkpointing (non-reentrant), frozen vision tower, fp32 master
weights with bf16 autocast on GPU, and one optimizer step per rollout step over the same number of responses in
micro-batches of ``--micro-batch``. A random model rarely stops by itself; with ``--force-length`` (default on) both
sides are kept from sampling eos so every response has exactly ``--max-new-tokens`` tokens (TRL: ``min_new_tokens``;
ours: eos added to the engine's suppressed ids). The output says whether the prompts, the responses per step and the
completion lengths matched.

    python benchmarks/grpo_vs_trl.py --steps 3 --prompts 8 --group 4 --max-new-tokens 128 --json grpo_vs_trl.json
    python benchmarks/grpo_vs_trl.py --tiny --steps 2                       # CPU smoke check (not a performance number)

Timing: a step is the wall time between the ends of consecutive optimizer steps (the first step is timed from the
start of training), so it includes rollout, reward, log-probs, update and per-step logging on both sides; steps
``<= --warmup`` are excluded. samples/s = responses per step / warm step seconds; generated tokens/s = completion
tokens of the warm steps / their seconds. Peak GPU memory is reset before each side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RL_FILE = "visual_search/vigorl_SA_RL.jsonl"


@dataclasses.dataclass
class BenchConfig:
    tiny: bool = False
    shape: str = "qwen2.5-vl-3b"
    max_pixels: int = 504 * 504  # shaped model's processor limit (the tiny model keeps its own)
    steps: int = 3
    warmup: int = 1
    prompts: int = 8
    group: int = 4
    max_new_tokens: int = 128
    micro_batch: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-6
    beta: float = 0.01
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    force_length: bool = True
    seed: int = 0
    sides: tuple[str, ...] = ("ours", "trl")
    work: str | None = None
    ours_set: tuple[str, ...] = ()  # extra recipe overrides for our side: how it computes, never what

    @property
    def responses(self) -> int:
        return self.prompts * self.group

    def check(self) -> None:
        if self.steps <= self.warmup:
            raise SystemExit(f"--steps ({self.steps}) must exceed --warmup ({self.warmup}): no warm step to time")
        if self.group < 2:
            raise SystemExit("--group must be at least 2 (TRL needs 2 generations per prompt)")
        if self.responses % self.micro_batch:
            raise SystemExit(f"--micro-batch ({self.micro_batch}) must divide prompts x group ({self.responses})")


# ---------------------------------------------------------------------------------------------------------------
# shared setup: model folder, samples, prompts of each step, reward
# ---------------------------------------------------------------------------------------------------------------

class Setup:
    def __init__(self, cfg: BenchConfig, log):
        import torch

        from vigorl_cli.data.demo import generate_demo
        from vigorl_cli.recipe import load_recipe
        from vigorl_cli.rewards.presets import build_reward
        from vigorl_cli.train.grpo import load_rl_samples, prompt_indices

        self.cfg = cfg
        self.cuda = torch.cuda.is_available()
        self.work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="grpo-vs-trl-"))
        root = self.work / "demo"
        if not (root / RL_FILE).exists():
            generate_demo(root, n_per_task=max(16, cfg.prompts * cfg.steps))
        if cfg.tiny:
            from vigorl_cli.models.tiny import tiny_path

            self.model = str(tiny_path("tiny-qwen2.5-vl"))
        else:
            from vigorl_cli.models.shapes import build_shaped

            t = time.time()
            self.model = str(build_shaped(cfg.shape, self.work / "model", max_pixels=cfg.max_pixels))
            log(f"built {cfg.shape} in {time.time() - t:.1f}s")
            if self.cuda:
                torch.cuda.empty_cache()
        n = cfg.responses
        self.sets = [f"data.root={root}", f"data.rl_train=[{RL_FILE}]", f"grpo.steps={cfg.steps}",
                     f"grpo.prompts_per_step={cfg.prompts}", f"grpo.group_size={cfg.group}",
                     f"grpo.responses_per_update={n}", f"grpo.micro_batch_size={cfg.micro_batch}", "grpo.ppo_epochs=1",
                     f"grpo.sampling.max_new_tokens={cfg.max_new_tokens}",
                     f"grpo.sampling.temperature={cfg.temperature}", f"grpo.sampling.top_p={cfg.top_p}",
                     "grpo.sampling.top_k=0", "grpo.truncated=keep", "grpo.save_every=100000",
                     f"engine.batch_size={n}",  # one generate call per step, as TRL's generation batch
                     "prompt.preset=vstar", f"grpo.lr={cfg.lr}", "grpo.warmup_ratio=0.0",
                     f"grpo.kl_coef={cfg.beta}", "grpo.kl_estimator=k3", "grpo.kl_in=loss",
                     f"grpo.weight_decay={cfg.weight_decay}", f"grpo.max_grad_norm={cfg.max_grad_norm}",
                     "grpo.clip_low=0.2", "grpo.clip_high=0.28", "grpo.adv_norm=std", "grpo.loss_agg=token_mean",
                     "grpo.objective=grpo", "grpo.filter_equal_groups=false", "grpo.gradient_checkpointing=true",
                     "grpo.freeze_vision=true", f"seed={cfg.seed}", *cfg.ours_set]
        self.recipe = load_recipe(None, self.sets)
        r = self.recipe
        self.samples = load_rl_samples([r.data_root() / f for f in r.data.rl_train], r.data.max_samples, r.seed,
                                       lambda *_: None)
        # the prompts of every step, in our loop's order (TRL walks the dataset in order: shuffle_dataset=False)
        self.order = [i for step in range(cfg.steps) for i in prompt_indices(len(self.samples), step, cfg.prompts,
                                                                             r.seed)]
        self.reward = build_reward(r.reward, multiturn=False)

    def reward_of(self, text: str, sample, frame, size) -> dict[str, float]:
        """Our single-turn reward exactly as `vigorl grpo` scores an episode (ground truth in the shown frame)."""
        from vigorl_cli.data.schema import Target
        from vigorl_cli.rewards.presets import RewardInput

        gt = None
        if sample.target is not None and (sample.target.box is not None or sample.target.point is not None):
            gt = Target(box=frame.box_from_original(sample.target.box, exact=True), frame="shown") \
                if sample.target.box is not None else \
                Target(point=frame.from_original(sample.target.point, exact=True, check=False), frame="shown")
        r = self.reward(RewardInput(response=text, sample=sample, gt=gt, tool_points=[], image_size=size))
        return r if isinstance(r, dict) else {"overall": float(r)}


def _peak_reset() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)


def _summarise(cfg: BenchConfig, ends: list[float], start: float, responses: list[int], tokens: list[int],
               rollout_s: list[float]) -> dict[str, Any]:
    """Per-step wall times from the ends of consecutive steps; warm = steps after --warmup."""
    step_s = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    w = slice(cfg.warmup, None)
    warm_s, warm_n, warm_tok = sum(step_s[w]), sum(responses[w]), sum(tokens[w])
    return {"steps_done": len(ends), "step_s": [round(x, 3) for x in step_s],
            "warm_step_s": round(warm_s / max(1, len(step_s[w])), 3),
            "samples_per_s": round(warm_n / warm_s, 3) if warm_s > 0 else None,
            "gen_tokens_per_s": round(warm_tok / warm_s, 1) if warm_s > 0 else None,
            "rollout_s": round(sum(rollout_s[w]) / max(1, len(rollout_s[w])), 3) if rollout_s else None,
            "rollout_tokens_per_s": round(warm_tok / sum(rollout_s[w]), 1) if rollout_s and sum(rollout_s[w]) else None,
            "responses_per_step": responses, "completion_tokens_per_step": tokens,
            "mean_completion_len": round(sum(tokens) / max(1, sum(responses)), 2)}


# ---------------------------------------------------------------------------------------------------------------
# ours: `vigorl grpo`'s own loop
# ---------------------------------------------------------------------------------------------------------------

class _StepClock:
    """A progress object for ``train(progress_factory=...)``: records when each step ended."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ends: list[float] = []

    def start(self):  # called once the models are loaded, right before the first step
        self.t0 = time.perf_counter()

    def add_task(self, *a, **k):
        return 0

    def update(self, task, completed=None, **k):
        self.ends.append(time.perf_counter())

    def stop(self):
        pass


@contextlib.contextmanager
def _no_eos(enabled: bool):
    """Our HF engine with its eos ids added to the suppressed ids (log-probs stay raw): every response runs to
    max_new_tokens, as TRL's ``min_new_tokens`` does on the other side."""
    from vigorl_cli.engines.hf import HFEngine

    if not enabled:
        yield
        return
    orig = HFEngine.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.suppress = sorted(set(self.suppress) | set(self.eos_ids))

    HFEngine.__init__ = init
    try:
        yield
    finally:
        HFEngine.__init__ = orig


def run_ours(st: Setup, log) -> dict[str, Any]:
    from vigorl_cli.train.grpo import train

    cfg = st.cfg
    clock: dict[str, _StepClock] = {}

    def factory():
        clock["c"] = _StepClock()
        return clock["c"]

    _peak_reset()
    out = st.work / "ours"
    with _no_eos(cfg.force_length):
        t = time.perf_counter()
        train(st.recipe, model=st.model, out=out, resume=False, log=lambda m: log(f"[ours] {m}"),
              progress_factory=factory)
    total = time.perf_counter() - t
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    c = clock["c"]
    res = _summarise(cfg, c.ends, c.t0, [cfg.responses] * len(rows),
                     [round(r["response_tokens"] * cfg.responses) for r in rows], [r["rollout_s"] for r in rows])
    res.update(peak_gib=_peak_gib(), total_s=round(total, 1),
               phases_s={k: [round(r[k], 3) for r in rows] for k in ("rollout_s", "reward_s", "logprob_s",
                                                                      "update_s")},
               logprob_diff_engine_vs_trainer=[r.get("logprob_diff_engine_vs_trainer") for r in rows],
               reward=[round(r["reward"], 4) for r in rows], truncated_frac=[r["truncated_frac"] for r in rows])
    _peak_reset()
    return res


# ---------------------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer on the same folder, prompts, reward
# ---------------------------------------------------------------------------------------------------------------

def trl_prompt(system: str, sample) -> list[dict]:
    """Our episode's prompt as TRL conversational messages (the image goes in the dataset's ``image`` column)."""
    # system content as a text block: Arrow cannot hold a string and a list in one column (renders identically)
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt_text()}]}]


def trl_reward(st: Setup, loaded: dict[int, tuple]):
    """Our reward preset as a TRL reward function: ``sample_idx`` (a dataset column) names the sample, ``loaded``
    maps it to ``(frame, shown image)``; the completion text is scored exactly as `vigorl grpo` scores a response."""

    def vigorl_reward(prompts, completions, sample_idx, **kw):
        out = []
        for c, i in zip(completions, sample_idx):
            text = c[-1]["content"] if isinstance(c, list) else c
            if isinstance(text, list):
                text = "".join(x.get("text", "") for x in text)
            frame, shown = loaded[i]
            out.append(float(st.reward_of(text, st.samples[i], frame, shown.size)["overall"]))
        return out

    return vigorl_reward


def run_trl(st: Setup, log) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from vigorl_cli.agent.images import load_for_model
    from vigorl_cli.models import prompts as prompt_lib
    from vigorl_cli.models.load import load_model, vision_special_ids
    from vigorl_cli.train.batching import image_token_count

    cfg, r = st.cfg, st.recipe
    _peak_reset()
    bundle = load_model(st.model, dtype="float32", attn_implementation=r.model.attn_implementation, device="cpu",
                        min_pixels=r.model.min_pixels, max_pixels=r.model.max_pixels)
    model, proc = bundle.model, bundle.processor
    for p in model.model.visual.parameters():  # as `vigorl grpo` (grpo.freeze_vision)
        p.requires_grad_(False)
    system = r.prompt.system or prompt_lib.system_prompt(r.prompt.preset, "single",
                                                         literal_newlines=r.prompt.literal_newlines)
    # the same images our loop shows (resized into the processor's pixel limits), same order of prompts
    loaded = {}
    for i in sorted(set(st.order)):
        s = st.samples[i]
        _, frame, shown = load_for_model(s.image_paths(r.data_root())[0], proc)
        loaded[i] = (frame, shown)
    ds = Dataset.from_dict({"prompt": [trl_prompt(system, st.samples[i]) for i in st.order],
                            "image": [loaded[i][1] for i in st.order], "sample_idx": st.order})

    # prompts: TRL's token ids vs ours (Episode prompt, image placeholders expanded as the trainer does)
    from vigorl_cli.agent.episode import Episode
    from vigorl_cli.train.grpo import rollout_episode_config

    ep_cfg = rollout_episode_config(r, False)
    prompt_match, prompt_lens = True, []
    for i in sorted(set(st.order)):
        frame, shown = loaded[i]
        ep = Episode(st.samples[i], shown, frame, system, proc, ep_cfg)
        ours = []
        for t in ep.prompt_ids:
            ours.extend([t] * image_token_count(proc, shown.size) if t == model.config.image_token_id else [t])
        msgs = prepare_multimodal_messages(trl_prompt(system, st.samples[i]), images=[shown])
        theirs = proc.apply_chat_template(conversation=[msgs], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"][0]
        theirs = theirs.tolist() if hasattr(theirs, "tolist") else list(theirs)
        prompt_match &= ours == theirs
        prompt_lens.append(len(ours))

    vigorl_reward = trl_reward(st, loaded)

    n = cfg.responses
    tok = proc.tokenizer
    gen_kwargs: dict[str, Any] = {"suppress_tokens": vision_special_ids(tok)}  # ours suppresses these too
    if cfg.force_length:
        gen_kwargs["min_new_tokens"] = cfg.max_new_tokens
    args = GRPOConfig(
        output_dir=str(st.work / "trl"), max_steps=cfg.steps, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=n // cfg.micro_batch, num_generations=cfg.group, num_iterations=1,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        generation_kwargs=gen_kwargs, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, beta=cfg.beta, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=st.cuda, use_cpu=not torch.cuda.is_available(),
        # the reference model: bf16 on GPU as ours (the policy itself is the fp32 instance passed in)
        model_init_kwargs={"dtype": "bfloat16" if st.cuda else "float32",
                           "attn_implementation": model.config._attn_implementation},
        shuffle_dataset=False, seed=cfg.seed, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, log_completions=False)

    class Clock(TrainerCallback):
        def __init__(self):
            self.start, self.ends = None, []

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    gens: list[tuple[int, int, float]] = []  # per generation call: responses, completion tokens, seconds

    gen_dtype: list[str] = []  # dtype the LM head computes in during TRL's generation (bf16 autocast on GPU?)

    class TimedGRPO(GRPOTrainer):
        def _generate(self, prompts):
            head = self.accelerator.unwrap_model(self.model).lm_head
            hook = head.register_forward_hook(lambda m, i, o: gen_dtype.append(str(o.dtype)) if not gen_dtype else None)
            t = time.perf_counter()
            try:
                out = super()._generate(prompts)
            finally:
                hook.remove()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            gens.append((len(out[1]), sum(len(c) for c in out[1]), time.perf_counter() - t))
            return out

    clock = Clock()
    t = time.perf_counter()
    trainer = TimedGRPO(model=model, reward_funcs=[vigorl_reward], args=args, train_dataset=ds,
                        processing_class=proc, callbacks=[clock])
    ref_dtype = str(next(trainer.ref_model.parameters()).dtype) if trainer.ref_model is not None else None
    trainer.train()
    total = time.perf_counter() - t
    logs = [x for x in trainer.state.log_history if "loss" in x or "reward" in x]
    res = _summarise(cfg, clock.ends, clock.start, [g[0] for g in gens], [g[1] for g in gens], [g[2] for g in gens])
    res.update(peak_gib=_peak_gib(), total_s=round(total, 1), generate_calls=len(gens),
               reward=[round(x.get("reward", float("nan")), 4) for x in logs],
               policy_dtype=str(next(model.parameters()).dtype), ref_dtype=ref_dtype,
               generate_compute_dtype=gen_dtype[0] if gen_dtype else None,
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    res["prompt_tokens_match_ours"] = bool(prompt_match)
    res["mean_prompt_tokens"] = round(sum(prompt_lens) / max(1, len(prompt_lens)), 1)
    del trainer, model, bundle
    _peak_reset()
    return res


# ---------------------------------------------------------------------------------------------------------------

def run(cfg: BenchConfig, log=print) -> dict[str, Any]:
    """Run the sides of ``cfg.sides`` in order; returns the report (also what --json writes)."""
    import torch
    import transformers

    import vigorl_cli

    cfg.check()
    st = Setup(cfg, log)
    report: dict[str, Any] = {
        "benchmark": "grpo_vs_trl", "device": torch.cuda.get_device_name(0) if st.cuda else "cpu",
        "model": "tiny-qwen2.5-vl" if cfg.tiny else cfg.shape, "config": dataclasses.asdict(cfg),
        "responses_per_step": cfg.responses,
        "precision": "fp32 master weights, bf16 autocast, bf16 reference" if st.cuda else "fp32",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "vigorl": getattr(vigorl_cli, "__version__", None)}}
    report["config"]["sides"] = list(cfg.sides)
    for side in cfg.sides:
        t = time.time()
        if side == "ours":
            report["ours"] = run_ours(st, log)
        elif side == "trl":
            import trl

            report["versions"]["trl"] = trl.__version__
            report["trl"] = run_trl(st, log)
        else:
            raise SystemExit(f"unknown side {side!r} (ours, trl)")
        log(f"{side}: {time.time() - t:.1f}s")
    if "ours" in report and "trl" in report:
        o, t = report["ours"], report["trl"]
        report["matched"] = {
            "responses_per_step": o["responses_per_step"] == t["responses_per_step"],
            "optimizer_steps": o["steps_done"] == t["steps_done"] == cfg.steps,
            "completion_lengths": o["completion_tokens_per_step"] == t["completion_tokens_per_step"],
            "prompt_tokens": t["prompt_tokens_match_ours"]}
        if o["samples_per_s"] and t["samples_per_s"]:
            report["speedup_samples_per_s"] = round(o["samples_per_s"] / t["samples_per_s"], 2)
    report["markdown"] = markdown(report)
    return report


def markdown(rep: dict[str, Any]) -> str:
    c = rep["config"]
    head = (f"{rep['model']} on {rep['device']}: {c['prompts']} prompts x {c['group']} responses, "
            f"{c['max_new_tokens']} new tokens, micro-batch {c['micro_batch']}, one optimizer step per rollout step, "
            f"{rep['precision']}; steps {c['warmup'] + 1}-{c['steps']} (warm)")
    lines = [head,
             "",
             "| | s / step | samples/s | generated tok/s | rollout s | mean completion len | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for side, name in (("ours", "vigorl grpo"), ("trl", f"TRL GRPOTrainer {rep['versions'].get('trl', '')}")):
        if side not in rep:
            continue
        s = rep[side]
        lines.append(f"| {name.strip()} | {s['warm_step_s']} | {s['samples_per_s']} | {s['gen_tokens_per_s']} | "
                     f"{s['rollout_s']} | {s['mean_completion_len']} | {s['peak_gib'] if s['peak_gib'] else '-'} |")
    if "matched" in rep:
        m = rep["matched"]
        lines += ["", "matched: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in m.items())
                  + (f"; speedup (samples/s) {rep['speedup_samples_per_s']}x" if "speedup_samples_per_s" in rep
                     else "")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    d = BenchConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny-qwen2.5-vl (CPU smoke check)")
    ap.add_argument("--shape", default=d.shape)
    ap.add_argument("--max-pixels", type=int, default=d.max_pixels)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--warmup", type=int, default=d.warmup, help="leading steps excluded from the timing")
    ap.add_argument("--prompts", type=int, default=None, help=f"prompts per step ({d.prompts}; --tiny: 2)")
    ap.add_argument("--group", type=int, default=None, help=f"responses per prompt ({d.group}; --tiny: 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help=f"({d.max_new_tokens}; --tiny: 16)")
    ap.add_argument("--micro-batch", type=int, default=None, help=f"responses per forward/backward "
                                                                   f"({d.micro_batch}; --tiny: 2)")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (0: no reference model)")
    ap.add_argument("--no-force-length", dest="force_length", action="store_false",
                    help="let responses stop at eos (lengths then differ between the sides)")
    ap.add_argument("--sides", default="ours,trl", help="which sides, in order: ours,trl | trl,ours | ours | trl")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for our side only, for speed features that change how it computes, not "
                         "what (e.g. engine.static_cache=true, model.compile=true); repeatable")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    small = {"prompts": 2, "group": 2, "max_new_tokens": 16, "micro_batch": 2}  # --tiny: a CPU smoke check in ~a minute
    for k, v in small.items():
        if getattr(a, k) is None:
            setattr(a, k, v if a.tiny else getattr(d, k))
    cfg = BenchConfig(tiny=a.tiny, shape=a.shape, max_pixels=a.max_pixels, steps=a.steps, warmup=a.warmup,
                      prompts=a.prompts, group=a.group, max_new_tokens=a.max_new_tokens, micro_batch=a.micro_batch,
                      temperature=a.temperature, top_p=a.top_p, lr=a.lr, beta=a.beta, force_length=a.force_length,
                      sides=tuple(x.strip() for x in a.sides.split(",") if x.strip()), work=a.work,
                      ours_set=tuple(a.ours_set))
    rep = run(cfg, log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in rep.items() if k != "markdown"}), flush=True)
    print(rep["markdown"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    main()
