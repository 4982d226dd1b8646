"""Built-in tiny Qwen-VL models, made offline, for tests, CI and the demo pipeline.

``tiny-qwen2-vl``, ``tiny-qwen2.5-vl`` and ``tiny-qwen3-vl`` are accepted anywhere a model name is. Each is a
normal HF folder (config, safetensors, tokenizer, chat template, processor files with the real
``processor_class``) built from scratch on first use and cached under ``$VIGORL_CACHE`` (default
``~/.cache/vigorl``):

* tokenizer: a byte-level BPE (Qwen2 pre-tokenizer regex, so no UNK) trained on a small in-memory corpus, wrapped
  in transformers' own ``Qwen2Tokenizer``, with Qwen's special tokens and ``<tool_call>``/``</tool_call>``.
  **Token ids differ from real Qwen**: always read them from the tokenizer or config.
* model: random weights from a fixed seed (same name → same weights), text head_dim 32 (vLLM-CPU supports head
  sizes 32, 64, ...; 16 breaks it), 2 layers, vision depth 2.
* image processor: at most 16 merged image tokens per image (``max_pixels = (patch*merge)^2 * 16``) so a demo run
  on a 2-core CPU is fast; crops and full images alike are squeezed into that budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = 1  # bump when the built artefacts change; part of the cache key
TINY_MODELS = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}
PROCESSOR_CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # plain added tokens in Qwen2.5 (not special: they survive decode)
VISION_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2-VL / Qwen2.5-VL chat template (the hub's text). Qwen3-VL's hub template differs; using the same one for the
# tiny Qwen3-VL keeps prompts identical across kinds, which is what the tests want.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
You are a helpful assistant. What is the color of the star? Answer Choices: A. red B. blue C. green D. yellow
<think> The target is near the top-left region (120, 64). The red circle is left of the blue square (300, 210). </think>
<answer> red </answer> <answer> (412, 88) </answer> <answer> left </answer> <answer> click [12] </answer>
<tool_call> {"name": "search_coordinate", "arguments": {"coordinate": [412, 88]}} </tool_call>
<observation> Here is the crop of the image centered on the coordinate, with a red dot at the coordinate location:
Click on the Submit button. Search bar, menu, settings, login, cancel, type [3] [blue shoes], scroll [down], go_back.
Is the cup on the left or right side of the laptop? Which object is closer to the camera? above below behind front
0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no left right top bottom center red green blue yellow orange purple white black
Wait, this seems off. Let's try something else. Based on all the information I've gathered, I'll now provide my answer.
"""


def cache_root() -> Path:
    return Path(os.environ.get("VIGORL_CACHE", Path.home() / ".cache" / "vigorl"))


def is_tiny(name: str) -> bool:
    return str(name) in TINY_MODELS


def build_tokenizer(vocab_size: int = 512):
    """Train the byte-level BPE and wrap it as a ``Qwen2Tokenizer`` with Qwen's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768,
                         clean_up_tokenization_spaces=False, split_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.add_tokens(TOOL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _special_ids(tok) -> dict[str, int]:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def make_config(kind: str, tok, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vision_hidden: int = 64, vision_depth: int = 2, vision_heads: int = 2):
    """A Qwen-VL config of the given kind with text head_dim = hidden/heads = 32."""
    import transformers

    vocab = (len(tok) + 63) // 64 * 64
    head_dim = hidden // heads
    half = head_dim // 2
    third = half * 3 // 8
    mrope = [half - 2 * third, third, third]  # sums to head_dim/2; Qwen's 128 → [16, 24, 24], ours 32 → [4, 6, 6]
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                rms_norm_eps=1e-6, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
    ids = _special_ids(tok)
    if kind == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                      hidden_act="silu")
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if kind == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2,
                      num_heads=vision_heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    if kind == "qwen3_vl":
        text3 = dict(text, head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                              "mrope_section": mrope, "mrope_interleaved": True})
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                      num_heads=vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=hidden, num_position_embeddings=64, deepstack_visual_indexes=[0])
        return transformers.Qwen3VLConfig(text_config=text3, vision_config=vision, tie_word_embeddings=False, **ids)
    raise ValueError(f"unknown tiny kind {kind!r}")


def image_processor_dict(kind: str) -> dict:
    """Processor settings: at most 16 merged tokens (64 patches) per image, at least 4."""
    patch = 16 if kind == "qwen3_vl" else 14
    f = patch * 2
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    if kind == "qwen3_vl":
        mean = std = [0.5, 0.5, 0.5]
    return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std,
            "do_convert_rgb": True, "size": {"shortest_edge": f * f * 4, "longest_edge": f * f * 16},
            "patch_size": patch, "temporal_patch_size": 2, "merge_size": 2, "resample": 3}


def _seed_for(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}/v{TINY_VERSION}".encode()).digest()[:4], "little")


def build_tiny(name: str, out_dir: str | Path) -> Path:
    """Build tiny model ``name`` into ``out_dir`` (a normal HF folder). Deterministic for a given name."""
    import torch
    from transformers import AutoModelForImageTextToText

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    kind = TINY_MODELS[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config = make_config(kind, tok)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(_seed_for(name))
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    gc = model.generation_config
    gc.do_sample = True
    gc.temperature, gc.top_p, gc.top_k = 1.0, 1.0, 0
    gc.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gc.pad_token_id = tok.pad_token_id
    # A random policy samples <|image_pad|> now and then, which later breaks the forward pass
    # ("Image features and image tokens do not match"): never sample vision special tokens.
    gc.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    model.save_pretrained(out)
    _save_processor_files(kind, tok, out)
    (out / "vigorl_tiny.json").write_text(json.dumps({"name": name, "kind": kind, "version": TINY_VERSION}))
    return out


def _save_processor_files(kind: str, tok, out: Path) -> None:
    """The files a hub Qwen-VL checkpoint has, written by hand (transformers cannot save a Qwen-VL processor
    without torchvision: see models/load.py)."""
    tok.save_pretrained(out)
    proc = image_processor_dict(kind)
    cls = PROCESSOR_CLASS[kind]
    (out / "preprocessor_config.json").write_text(json.dumps({**proc, "processor_class": cls}, indent=2))
    (out / "processor_config.json").write_text(json.dumps({"image_processor": proc, "processor_class": cls}, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = cls
    cfg_path.write_text(json.dumps(cfg, indent=2))


def tiny_path(name: str) -> Path:
    """The cached folder of tiny model ``name``, built on first use (atomically: temp folder, then rename)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    final = cache_root() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (final / "vigorl_tiny.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build_tiny(name, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: theirs is identical (deterministic build)
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
