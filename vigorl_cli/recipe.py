"""The YAML recipe: one typed config shared by every subcommand.

Loading order (EasyR1-style structured merge): dataclass defaults → the YAML file → ``--set a.b=c`` overrides.
Every problem (unknown key, wrong type, bad choice) is collected and raised as one :class:`RecipeError` whose
lines each name the file, the key and what was expected. Each field has one home: code that needs the KL
coefficient reads ``recipe.grpo.kl_coef``; nothing copies values between sections.

Defaults follow the reference (Gabesarch/grounded-rl, see ``docs/recipes.md`` for the field reference and the
places where we deliberately differ).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from vigorl_cli.errors import RecipeError


def F(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002 - mirrors argparse
    """A field with its documentation (shown by ``vigorl recipe check --explain`` and in docs/recipes.md)."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = F("tiny-qwen2.5-vl", "HF hub id, local folder, or a built-in tiny model "
                                     "(tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = F("auto", "auto: bfloat16 on GPU, float32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = F(
        "auto", "auto: flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa")
    vision_attention: Literal["auto", "hf", "batched", "varlen"] = F(
        "auto", "vision-tower attention: batched = one sdpa call per layer over all images and windows (padded, "
                "any device); varlen = one flash varlen call (CUDA, fp16/bf16); hf = HF's per-window loop; auto: "
                "batched, or HF's attention when the tower already runs flash_attention_2. All but hf also run the "
                "patch embedding's Conv3d as one matmul and Qwen2.5-VL's 3420-wide vision MLP zero-padded to 3424 "
                "(same weights; cuBLAS's fast kernels need aligned widths)")
    compile: bool = F(False, "sft/grpo: torch.compile each decoder layer and vision block (regional; fuses norms, "
                             "rotary and activations; attention stays eager); costs compile time on the first steps; "
                             "single process or fsdp2")
    min_pixels: int | None = F(None, "processor min pixels per image (None: the checkpoint's own setting)")
    max_pixels: int | None = F(None, "processor max pixels per image (None: the checkpoint's own setting)")
    revision: str | None = F(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = F(False, "allow custom modelling code from the hub")


@dataclass
class DataConfig:
    root: str = F("${VIGORL_DATA_ROOT:-data}", "DATA_ROOT: folder the relative image paths and data files are under")
    mcts: list[str] = F([], "MCTS input files (LLaVA conversations jsonl), relative to root")
    sft_train: list[str] = F([], "SFT training files (sharegpt json); empty: the linearize output of this run")
    sft_val: list[str] = F([], "SFT validation files")
    rl_train: list[str] = F([], "GRPO training files ({problem, answer, images} jsonl)")
    rl_val: list[str] = F([], "GRPO validation files ({problem, answer, images} jsonl), used every grpo.val_every "
                              "steps")
    max_samples: int | None = F(None, "use at most this many samples per file (after a seeded shuffle)")


@dataclass
class PromptConfig:
    preset: str = F("spatial", "system prompt preset: web_grounding, spatial, vstar, web_action (see `vigorl "
                                "recipe prompts`); the stage picks the single-turn, multi-turn or MCTS variant")
    system: str | None = F(None, "explicit system prompt text; overrides the preset")
    literal_newlines: bool = F(False, "reference-compatible: RL/eval prompts keep literal backslash-n sequences "
                                      "as the reference's jinja files do (reference §5.3)")


# What an unset (None) zoom-tool key means outside eval (grpo, mcts, linearize): the reference's V* settings.
# In eval an unset key means "the benchmark's own setting" (its zoom preset and turn limit).
TOOL_DEFAULTS: dict[str, Any] = {"offset": 182, "crop_size": 672, "draw_dot": False, "max_turns": 5,
                                 "max_images": 5}


def resolve_observation_style(style: str, compat_eval: bool = False) -> str:
    """``tool.observation_style`` in effect: ``auto`` → ``rl`` (what the released RL checkpoints were trained with),
    or ``eval`` (the reference eval wrapper's text) for reference-compatible evaluation; other styles as given."""
    if style != "auto":
        return style
    return "eval" if compat_eval else "rl"


@dataclass
class ToolConfig:
    enabled: bool = F(False, "multi-turn: the model may call the zoom tool (search_coordinate)")
    offset: int | None = F(None, "half-width of the crop window in pixels of the image the model sees (V*: 182, web "
                                 "grounding: 100 / RL 50); null: the benchmark's zoom preset in eval, 182 elsewhere")
    crop_size: int | None = F(None, "crop is resized to this side, rounded to a multiple of 28 (672, 512→504, "
                                    "384→392); null: the benchmark's zoom preset in eval, 672 elsewhere")
    draw_dot: bool | None = F(None, "draw a red dot (r=7, white outline) at the requested point; null: the "
                                    "benchmark's zoom preset in eval, false elsewhere")
    max_turns: int | None = F(None, "maximum assistant turns per episode (tool calls + final answer); null: the "
                                    "benchmark's limit in eval, 5 elsewhere")
    max_images: int | None = F(None, "maximum images per episode (the question image + crops); null: the "
                                     "benchmark's limit in eval (5), 5 elsewhere")
    observation_style: Literal["auto", "rl", "sft", "eval"] = F(
        "auto", "text of the observation turn: rl (reference GRPO rollout, what the released RL checkpoints were "
                "trained with), sft (the multi-turn SFT data), eval (the reference eval wrapper); auto: rl, except "
                "that `vigorl eval --compat` uses eval")

    def value(self, key: str) -> Any:
        """The setting ``key``, with an unset (None) one replaced by :data:`TOOL_DEFAULTS` (grpo, mcts, linearize)."""
        v = getattr(self, key)
        return TOOL_DEFAULTS[key] if v is None else v

    def zoom(self) -> Any:
        """The :class:`~vigorl_cli.vision.zoom.ZoomTool` these settings describe (unset keys: :data:`TOOL_DEFAULTS`)."""
        from vigorl_cli.vision.zoom import ZoomTool

        return ZoomTool(offset=self.value("offset"), crop_size=self.value("crop_size"),
                        draw_dot=self.value("draw_dot"))

    def style(self, compat_eval: bool = False) -> str:
        """The observation style to use (:func:`resolve_observation_style`)."""
        return resolve_observation_style(self.observation_style, compat_eval)


@dataclass
class SamplingConfig:
    temperature: float = F(1.0, "sampling temperature (0: greedy)")
    top_p: float = F(1.0, "nucleus sampling")
    top_k: int = F(0, "top-k sampling (0: off; HF generate's default of 50 is NOT applied)")
    max_new_tokens: int = F(512, "tokens per generation call")
    repetition_penalty: float = F(1.0, "1.0: off (reference upstream-latest uses 1.05 for MCTS and eval)")
    n: int = F(1, "samples per prompt")


@dataclass
class RolloutSamplingConfig(SamplingConfig):
    stop: list[str] = F([], "extra stop strings per turn, added to multi-turn's own (</tool_call>, </answer>, end of "
                            "turn); reference: none single-turn")


@dataclass
class EngineConfig:
    backend: Literal["hf", "vllm", "openai"] = F("hf", "hf: transformers generate (any machine); vllm: offline "
                                                       "vllm.LLM; openai: OpenAI-compatible servers")
    batch_size: int = F(16, "hf: prompts per generate call")
    static_cache: bool = F(False, "hf: static KV cache and our decode loop, each decode step (forward + sampling) "
                                  "captured as one CUDA graph on a GPU (Qwen-VL families, sdpa/eager attention; "
                                  "others: transformers' compiled static-cache generate); cache length bucketed to "
                                  "multiples of 256 tokens, graphs reused across calls of one batch size")
    continuous_batching: bool = F(False, "hf: continuous batching over engine.batch_size slots of one static KV "
                                         "cache (each decode step one CUDA graph on a GPU): episodes run without a "
                                         "turn barrier, as with vllm; cache length engine.max_model_len (default "
                                         "grpo's max_prompt_len + max_response_len, else 8192); single process")
    decode_backend: Literal["auto", "cudnn", "efficient", "flash", "math"] = F(
        "auto", "hf (static_cache, continuous_batching): the sdpa backend of the decode steps' attention (auto: "
                "torch's choice; benchmarks/decode_attention.py compares them)")
    share_prompts: bool = F(False, "hf (static_cache, continuous_batching): rows of one prefill with the same prompt "
                                   "(tokens and image keys: a GRPO group's first turns, a request's n samples) are "
                                   "fed once, the others copy its keys and values (not faster yet on an H200: "
                                   "docs/performance.md)")
    prefill_overlap: bool | None = F(None, "hf continuous batching: prefill on a side CUDA stream beside the decode "
                                           "(None: the engine's default, off; docs/performance.md, issue 7)")
    prefill_min: int | None = F(None, "hf continuous batching: rows worth a prefill while other slots decode "
                                      "(None: a quarter of the slots)")
    prefill_wait: int | None = F(None, "hf continuous batching: host checks a free slot waits for prefill_min rows "
                                       "(None: the engine's, 4)")
    prefill_cover: int | None = F(None, "hf continuous batching with prefill_overlap: decode steps launched before "
                                        "an overlapped prefill (None: the engine's, 16)")
    prefill_graphs: bool | None = F(None, "hf continuous batching: the language model's prefill at bucketed shapes, "
                                          "one CUDA graph per bucket on a GPU (None: the engine's default, off)")
    prefill_eager: bool | None = F(None, "hf continuous batching: prefills without model.compile's compiled norms "
                                         "and MLPs (less host time per prefill; decode keeps them) (None: the "
                                         "engine's default, off)")
    vision_graphs: bool | None = F(None, "hf continuous batching: a prefill's vision tower per group of same-grid "
                                         "images (zoom crops), one CUDA graph per (grid, count) on a GPU (None: the "
                                         "engine's default: on a GPU, off on CPU)")
    launch_before_collect: bool | None = F(None, "hf continuous batching on a GPU: the next decode chunk is launched "
                                                 "before the host collects the one in flight (from a host copy of "
                                                 "its results), so the GPU does not wait for the host's checks "
                                                 "(None: the engine's default, off)")
    prepare_threads: int | None = F(None, "hf continuous batching: threads that process a submitted request's new "
                                          "images (resize, normalise) in the background, off the host's critical "
                                          "path (None: the engine's default, 0: on the main thread)")
    vision_ahead: bool | None = F(None, "hf continuous batching: the new images of waiting requests are encoded "
                                        "before their prefill, on a side CUDA stream beside the decode, into the "
                                        "feature cache their prefill reads (None: the engine's default, off)")
    base_urls: list[str] = F([], "openai: server URLs (load-balanced), e.g. http://localhost:9001/v1")
    api_key: str | None = F(None, "openai: API key (default: $OPENAI_API_KEY or 'EMPTY')")
    served_model: str | None = F(None, "openai: model name the server serves (default: model.name)")
    concurrency: int = F(64, "openai: requests in flight per endpoint")
    timeout_s: float = F(120.0, "openai: per-request timeout")
    max_retries: int = F(3, "openai: retries with exponential backoff")
    gpu_memory_utilization: float = F(0.7, "vllm: fraction of GPU memory for weights + KV cache")
    tensor_parallel_size: int = F(1, "vllm: tensor parallel degree")
    max_model_len: int | None = F(None, "vllm: context length (None: the model's); hf continuous batching: its cache "
                                        "length")
    enforce_eager: bool = F(False, "vllm: disable CUDA graphs")
    no_barrier: bool = F(True, "vllm: submit an episode's next turn as soon as its previous turn returns (false: "
                               "turn-synchronous batches, every turn waits for all episodes' turns)")
    sleep_mode: bool | None = F(None, "vllm, grpo: sleep the engine (free its GPU memory) during the update; "
                                      "None: on with CUDA, off elsewhere (vLLM-CPU has no sleep mode)")
    sleep_level: Literal[1, 2] = F(1, "vllm, grpo: 1 offloads the weights to CPU memory, 2 drops them (the full "
                                      "weight push after the update restores them)")


@dataclass
class MCTSConfig:
    mode: Literal["singleturn", "multiturn"] = F("singleturn", "multiturn: thought steps may call the zoom tool")
    simulations: int = F(8, "MCTS simulations per sample (reference script 8, paper 20)")
    max_depth: int = F(10, "maximum tree depth")
    children_per_expand: int = F(3, "children sampled per expansion")
    rollouts_per_node: int = F(2, "rollouts from each new child")
    rollout_max_steps: int = F(5, "thought steps per rollout before a forced final answer")
    c_puct: float = F(2.0, "exploration constant in Q + c*sqrt(ln(N_parent+1)/(n+1))")
    min_thoughts: int = F(3, "'at least N thoughts' line: N drawn uniformly from [min_thoughts, max_thoughts]")
    max_thoughts: int = F(7, "upper bound of N (inclusive)")
    add_thought_number: bool = F(True, "append the 'at least N thoughts' line to the system prompt")
    judge: str = F("auto", "judge name (auto: from the sample's task)")
    max_samples: int | None = F(None, "search at most this many samples per input file (seeded shuffle); "
                                      "overrides data.max_samples, --limit overrides it")
    model: str | None = F(None, "teacher model for the search (default: model.name); the reference used "
                                "Qwen/Qwen2.5-VL-72B-Instruct behind vLLM servers")
    engine: Literal["hf", "vllm", "openai"] | None = F(None, "engine backend for the search (default: engine.backend)")
    trees_in_flight: int = F(16, "trees searched concurrently (their pending generations are batched)")
    sample_timeout_s: float = F(3600.0, "per-sample time limit; a timed-out sample is recorded as an error")
    sampling: SamplingConfig = F(SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512),
                                 "sampling for each thought step")
    stop: list[str] = F([], "stop strings for each thought step (reference: none; e.g. ['</think>', '</answer>'] "
                            "saves the tokens a teacher writes past its one step)")
    compat: bool = F(False, "reference judging: reference judges, and a rollout that never answers is judged on its "
                            "last thought (ours: scores 0)")
    group_n: bool = F(True, "send the samples of one expansion as one request with n > 1 (same trees either way)")


@dataclass
class LinearizeConfig:
    val_fraction: float = F(0.05, "fraction of trees (by tree) held out for validation")
    max_chains_per_tree: int = F(10000, "cap on chains per tree (seeded sample)")
    backtrack_text: str = F("Wait, this seems off. Let's try something else.", "joins a wrong and a correct rollout")
    multiturn: bool = F(False, "also write multi-turn dialogs with zoom crops")
    shuffle_prob: float = F(0.2, "multi-turn: probability of moving the first tool call later")
    min_pixels: int = F(2_700_000, "multi-turn: full image is resized into [min_pixels, max_pixels]")
    max_pixels: int = F(2_850_000, "multi-turn: see min_pixels")
    select: Literal["all", "value"] = F("all", "all: every direct and corrected chain (reference); value: rank "
                                               "chains by node values, cap corrected chains, dedupe by coordinates")
    max_corrected_per_tree: int = F(20, "select=value: at most this many corrected chains per tree")
    compat: bool = F(False, "reproduce the reference linearizer's quirks (answer text kept with a think block "
                            "written in the same response; no letter stripping)")


@dataclass
class LoraConfig:
    enabled: bool = F(False, "train LoRA adapters instead of all weights")
    r: int = F(8, "rank")
    alpha: int = F(16, "scaling numerator")
    dropout: float = F(0.0, "dropout on the LoRA input")
    target_modules: str = F(r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                            "regex of modules to adapt (default: language model only, not the vision tower)")


@dataclass
class SFTConfig:
    lr: float = F(1e-6, "peak learning rate (reference 1e-6)")
    weight_decay: float = F(0.01, "AdamW weight decay")
    epochs: float = F(1.0, "passes over the data (reference script 1, paper 3)")
    max_steps: int | None = F(None, "stop after this many optimizer steps (overrides epochs)")
    warmup_ratio: float = F(0.03, "linear warmup fraction, then cosine decay")
    micro_batch_size: int = F(1, "samples per forward pass per process")
    grad_accum: int = F(4, "micro-batches per optimizer step (reference: 1 × 4 × 8 GPUs = 32)")
    max_seq_len: int = F(8192, "longer samples are dropped and counted (never cut through an image)")
    max_grad_norm: float = F(1.0, "gradient clipping")
    freeze_vision: bool = F(True, "keep the vision tower frozen (reference default)")
    gradient_checkpointing: bool = F(True, "recompute activations of the language model in backward")
    packing: bool = F(False, "padding-free packing of several samples per micro-batch")
    precision: Literal["auto", "fp32", "bf16"] = F("auto", "auto: bf16 on GPU, fp32 on CPU")
    parallel: Literal["single", "fsdp2", "deepspeed"] = F("single", "single process, FSDP2 or DeepSpeed (torchrun)")
    deepspeed_config: str | None = F(None, "DeepSpeed JSON config (ZeRO-2/3)")
    lora: LoraConfig = F(LoraConfig(), "LoRA settings")
    save_every: int = F(100, "optimizer steps between checkpoints")
    keep_last: int = F(2, "checkpoints kept")
    log_every: int = F(1, "optimizer steps between metric lines")
    eval_every: int = F(0, "optimizer steps between validation-loss passes over data.sft_val (0: only at the end)")
    logprob_chunk: int = F(1024, "loss: rows of logits computed at once (each chunk is recomputed in backward)")


@dataclass
class RewardConfig:
    preset: str = F("auto", "auto (from task and tool), grounded_thinking, multiturn, vanilla_thinking, "
                            "string_match, point_in_box, web_action, or module:function")
    accuracy_weight: float = F(0.5, "single-turn: 0.5·acc + 0.5·fmt·grounded; multi-turn reference: 0.6")
    format_weight: float = F(0.5, "single-turn 0.5; multi-turn reference 0.4")
    diversity_bonus: float = F(0.2, "multi-turn: bonus per extra distinct crop coordinate")
    diversity_max_crops: int = F(4, "multi-turn: crops counted for the bonus")
    diversity_min_dist: float = F(10.0, "multi-turn: pixels apart for two crops to count as distinct")


@dataclass
class GRPOConfig:
    steps: int = F(500, "rollout steps")
    prompts_per_step: int = F(128, "prompts sampled per rollout step")
    group_size: int = F(5, "responses per prompt (reference single-turn 5, multi-turn 8)")
    responses_per_update: int = F(320, "responses per optimizer step (single-turn 64 prompts × 5)")
    micro_batch_size: int = F(2, "responses per forward/backward")
    ppo_epochs: int = F(1, "passes over each rollout batch")
    lr: float = F(1e-6, "learning rate (constant after warmup)")
    weight_decay: float = F(0.01, "AdamW weight decay")
    warmup_ratio: float = F(0.0, "warmup fraction (reference script 0.0, paper 0.05)")
    max_grad_norm: float = F(1.0, "gradient clipping (multi-turn reference 0.2)")
    clip_low: float = F(0.2, "PPO ratio clip below 1")
    clip_high: float = F(0.28, "PPO ratio clip above 1 (clip-higher)")
    clip_dual: float = F(3.0, "dual-clip bound for negative advantages")
    kl_coef: float = F(0.01, "KL weight to the frozen reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "k3: low-variance KL, clamped to ±10")
    kl_in: Literal["loss", "reward"] = F("loss", "KL as a loss term, or kl_coef·Σ_t kl_t subtracted from "
                                                          "each response's reward before the group advantages")
    adv_norm: Literal["std", "none"] = F("std", "std: (r-mean)/(std+1e-6); none: r-mean (Dr. GRPO)")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = F(
        "token_mean", "how per-token losses are averaged")
    objective: Literal["grpo", "gspo"] = F("grpo", "token ratios (GRPO) or sequence ratios (GSPO)")
    filter_equal_groups: bool = F(False, "DAPO: drop groups whose rewards are all equal")
    tis_cap: float | None = F(None, "truncated importance sampling cap between engine and trainer log-probs")
    max_prompt_len: int = F(4096, "prompt tokens, image tokens expanded (longer prompts are "
                                         "dropped and counted per step)")
    max_response_len: int = F(2048, "response tokens (multi-turn: including observations)")
    truncated: Literal["mask", "penalize", "keep"] = F("mask", "what to do with trajectories cut by a limit")
    parallel: Literal["single", "fsdp2", "deepspeed"] = F("single", "single process, FSDP2 or DeepSpeed (torchrun)")
    gradient_checkpointing: bool = F(True, "recompute activations in backward")
    packing: bool = F(True, "padding-free micro-batches (one row of concatenated trajectories) for the log-prob "
                            "passes and the update; false: right-padded rows")
    freeze_vision: bool = F(True, "keep the vision tower frozen")
    save_every: int = F(50, "rollout steps between checkpoints")
    keep_last: int = F(2, "checkpoints kept")
    sampling: RolloutSamplingConfig = F(RolloutSamplingConfig(temperature=1.0, top_p=0.99, max_new_tokens=1024,
                                                              n=5), "rollout sampling (max_new_tokens is per turn)")
    val_every: int = F(0, "rollout steps between validation passes over data.rl_val (one episode per sample, logged "
                          "as val/accuracy and val/reward; also after the last step); 0: off")
    val_temperature: float = F(0.5, "sampling temperature of the validation episodes (reference val: 0.5)")


@dataclass
class EvalConfig:
    benches: list[str] = F([], "benchmarks to run (see `vigorl eval --list`)")
    mode: Literal["auto", "single", "multi"] = F("auto", "auto: each benchmark's default mode")
    samples: int = F(1, "samples per question (Avg@k)")
    max_samples: int | None = F(None, "evaluate at most this many questions per benchmark")
    compat: bool = F(False, "reference-compatible scoring and prompts (reference §6)")
    prompt_variant: str | None = F(None, "system prompt variant instead of the mode's (e.g. answer_only for base "
                                         "models, vanilla); see `vigorl recipe check --explain` prompt.preset")
    max_response_tokens: int = F(8192, "multi-turn: tokens per episode after the prompt (sampled + observations)")
    sampling: SamplingConfig = F(SamplingConfig(temperature=0.5, top_p=1.0, max_new_tokens=2048),
                                 "eval sampling (reference: temperature 0.5, one sample, 2048 tokens)")


@dataclass
class OutputConfig:
    dir: str = F("runs/vigorl", "run folder (every command also takes --out)")
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = F(["jsonl"], "metric sinks; jsonl is always on")
    wandb_project: str | None = F(None, "W&B project when wandb is among loggers")


@dataclass
class Recipe:
    model: ModelConfig = F(ModelConfig(), "the policy / teacher model")
    data: DataConfig = F(DataConfig(), "data files")
    prompt: PromptConfig = F(PromptConfig(), "system prompts")
    tool: ToolConfig = F(ToolConfig(), "the zoom tool")
    engine: EngineConfig = F(EngineConfig(), "generation backend")
    mcts: MCTSConfig = F(MCTSConfig(), "vigorl mcts")
    linearize: LinearizeConfig = F(LinearizeConfig(), "vigorl linearize")
    sft: SFTConfig = F(SFTConfig(), "vigorl sft")
    reward: RewardConfig = F(RewardConfig(), "rewards for grpo")
    grpo: GRPOConfig = F(GRPOConfig(), "vigorl grpo")
    eval: EvalConfig = F(EvalConfig(), "vigorl eval")
    output: OutputConfig = F(OutputConfig(), "outputs and logging")
    seed: int = F(42, "run seed; per-sample seeds derive from (seed, sample id, turn)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    def data_root(self) -> Path:
        return Path(expand_env(self.data.root))


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

def expand_env(value: str) -> str:
    """``${VAR}`` and ``${VAR:-default}`` expansion (shell style) for path-like strings."""
    import re

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", sub, value)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if is_dataclass(tp):
        return f"section with keys {', '.join(f.name for f in fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[str], where: str) -> Any:
    """Check ``value`` against ``tp``; return the typed value (appending to ``errors`` when it does not fit)."""
    origin = get_origin(tp)
    bad = object()

    def fail() -> Any:
        errors.append(f"{where}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return bad

    if is_dataclass(tp):
        if not isinstance(value, dict):
            return fail()
        return _build(tp, value, key, errors, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, a, key, trial, where)
            if not trial:
                return out
        return fail()
    if origin is Literal:
        return value if value in get_args(tp) else fail()
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, str):  # `--set eval.benches=vstar,blink` or a single YAML string
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                return fail()
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", errors, where) for i, v in enumerate(value)]
    if origin is dict:
        return dict(value) if isinstance(value, dict) else fail()
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` as a string
            try:
                return float(value)
            except ValueError:
                return fail()
        return fail()
    if tp is str:
        return value if isinstance(value, str) else fail()
    return value


def _build(cls: type, data: dict, prefix: str, errors: list[str], where: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            section = f"'{prefix}'" if prefix else "the recipe"
            close = _close_matches(str(k), names)
            errors.append(f"{where}: unknown key '{key}'{close}; valid keys in {section}: {', '.join(names)}")
            continue
        kwargs[k] = _coerce(v, hints[k], key, errors, where)
    try:
        return cls(**{k: v for k, v in kwargs.items()})
    except TypeError as e:  # pragma: no cover - defensive
        errors.append(f"{where}: {prefix}: {e}")
        return cls()


def _close_matches(word: str, options: list[str]) -> str:
    import difflib

    m = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{m[0]}'?)" if m else ""


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_type(path: list[str]) -> Any:
    """The declared type at a dotted path, or None when the path does not exist."""
    tp: Any = Recipe
    for part in path:
        if not is_dataclass(tp):
            return None
        hints = get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _wants_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return str in get_args(tp)
    return False


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sft.lr=2e-5"`` → (["sft", "lr"], 2e-5). Values are YAML-typed; string fields keep the raw text."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value", hint="e.g. --set sft.lr=2e-5")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {text!r}: empty key")
    tp = _leaf_type(path)
    if tp is not None and _wants_str(tp) and raw.strip() not in ("null", "~", "None"):
        return path, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Defaults ← YAML file ← ``--set`` overrides, validated into a :class:`Recipe`."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe not found: {path}", hint="`vigorl recipe ls` lists the bundled recipes")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    errors: list[str] = []
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        data = _deep_merge(data, nested)
    # `--set` errors name the override, file errors the file; both are reported together.
    recipe = _build(Recipe, data, "", errors, where if not overrides else f"{where} (+ --set)")
    if errors:
        raise RecipeError("\n".join(errors), hint="`vigorl recipe check FILE --explain` lists every key with its type")
    problems = check_semantics(recipe)
    if problems:
        raise RecipeError("\n".join(f"{where}: {p}" for p in problems))
    return recipe


def check_semantics(r: Recipe) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    out = []
    if r.mcts.min_thoughts > r.mcts.max_thoughts:
        out.append(f"'mcts.min_thoughts' ({r.mcts.min_thoughts}) must be <= 'mcts.max_thoughts' ({r.mcts.max_thoughts})")
    if r.grpo.group_size < 2:
        out.append("'grpo.group_size' must be >= 2 (group-normalised advantages need at least two responses)")
    if r.grpo.responses_per_update % r.grpo.micro_batch_size:
        out.append("'grpo.responses_per_update' must be a multiple of 'grpo.micro_batch_size'")
    if r.grpo.val_every < 0:
        out.append("'grpo.val_every' must be >= 0 (0: no validation)")
    if r.grpo.val_every > 0 and not r.data.rl_val:
        out.append("'grpo.val_every' is set but 'data.rl_val' is empty")
    for name in ("sft", "grpo"):
        sec = getattr(r, name)
        if sec.lr <= 0:
            out.append(f"'{name}.lr' must be > 0")
        if not 0 <= sec.warmup_ratio < 1:
            out.append(f"'{name}.warmup_ratio' must be in [0, 1)")
    if not 0 <= r.linearize.val_fraction < 1:
        out.append("'linearize.val_fraction' must be in [0, 1)")
    if r.tool.crop_size is not None and r.tool.crop_size < 28:
        out.append("'tool.crop_size' must be >= 28")
    for key in ("offset", "max_turns", "max_images"):
        v = getattr(r.tool, key)
        if v is not None and v < (0 if key == "offset" else 1):
            out.append(f"'tool.{key}' must be >= {0 if key == 'offset' else 1}")
    for key in ("prefill_min", "prefill_wait", "prefill_cover"):
        v = getattr(r.engine, key)
        if v is not None and v < 1:
            out.append(f"'engine.{key}' must be >= 1")
    if r.engine.prepare_threads is not None and r.engine.prepare_threads < 0:
        out.append("'engine.prepare_threads' must be >= 0")
    if r.engine.backend == "openai" and not r.engine.base_urls:
        out.append("'engine.backend' is openai but 'engine.base_urls' is empty")
    return out


def explain(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, depth first: the recipe reference."""
    rows = []
    hints = get_type_hints(cls)
    inst = cls()
    for f in fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.append((key, "section", "", f.metadata.get("help", "")))
            rows.extend(explain(tp, key))
        else:
            rows.append((key, _type_name(tp), repr(getattr(inst, f.name)), f.metadata.get("help", "")))
    return rows



def reference_markdown() -> str:
    """docs/recipes.md: every key with type, default and help (kept current by a test)."""
    lines = ["# Recipe reference", "",
             "Generated from `vigorl_cli/recipe.py` (`vigorl recipe check FILE --explain` prints the same).",
             "Loading order: dataclass defaults → YAML file → `--set section.key=value` (typed, repeatable).",
             "Strings in `data.root` expand `${VAR}` and `${VAR:-default}`.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in explain():
        if tp == "section":
            lines.append(f"| **{key}** | section | | {help_} |")
        else:
            lines.append(f"| `{key}` | {tp.replace('|', '/')} | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
