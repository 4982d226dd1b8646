"""Real-shaped random models for GPU benchmarks (no weights can be downloaded on the benchmark machines).

``build_shaped("qwen2.5-vl-3b", out_dir)`` writes an HF folder with the public Qwen2.5-VL-3B-Instruct architecture
(3.75 B parameters), HF's random init, and the tiny model's tokenizer and processor files. The vocabulary keeps its
real size (151 936) so the LM head costs what it really costs; ids beyond the tiny tokenizer decode to nothing,
which is fine for throughput work (a random model over 152 k tokens practically never samples eos, so every
sequence runs to ``max_new_tokens`` in every compared path). The image processor gets real pixel limits.
"""

from __future__ import annotations

from pathlib import Path

SHAPES = {
    # Qwen2.5-VL-3B-Instruct config.json values
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        tie_word_embeddings=True),
    # Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        tie_word_embeddings=False),
}


def shaped_config(shape: str):
    import transformers

    from vigorl_cli.models.tiny import _special_ids, build_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    tok = build_tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(spec["text"], bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=dict(spec["vision"]),
                                        tie_word_embeddings=spec["tie_word_embeddings"], **_special_ids(tok))
    return cfg, tok


def build_shaped(shape: str, out_dir: str | Path, dtype: str = "bfloat16", device: str | None = None,
                 max_pixels: int = 28 * 28 * 1280) -> Path:
    """Write a random model of ``shape`` as an HF folder (config, safetensors, tokenizer, processor)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.tiny import VISION_SPECIAL_TOKENS, _save_processor_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, tok = shaped_config(shape)
    torch_dtype = getattr(torch, dtype)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch_dtype)
    gc = model.generation_config
    gc.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gc.pad_token_id = tok.pad_token_id
    gc.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    model.save_pretrained(out)
    _save_processor_files("qwen2_5_vl", tok, out)
    # real pixel limits instead of the tiny model's 16-token budget
    import json

    for name in ("preprocessor_config.json", "processor_config.json"):
        p = out / name
        d = json.loads(p.read_text())
        target = d["image_processor"] if "image_processor" in d else d
        target["size"] = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        p.write_text(json.dumps(d, indent=2))
    del model
    return out


def shaped_bundle(shape: str, dtype: str = "bfloat16", device: str | None = None, max_pixels: int = 28 * 28 * 1280,
                  attn_implementation: str = "sdpa", vision_attention: str = "auto"):
    """The same model as :func:`build_shaped`, in memory (no multi-GB write and read back): a ModelBundle.

    ``vision_attention`` as in :func:`~vigorl_cli.models.load.load_model` (``hf`` for HF's per-window loop)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.load import ModelBundle, load_processor
    from vigorl_cli.models.tiny import VISION_SPECIAL_TOKENS, tiny_path
    from vigorl_cli.models.vision_attention import set_vision_attention

    cfg, tok = shaped_config(shape)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(dev):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=getattr(torch, dtype),
                                                        attn_implementation=attn_implementation)
    model.eval()
    set_vision_attention(model, vision_attention)
    gc = model.generation_config
    gc.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gc.pad_token_id = tok.pad_token_id
    gc.suppress_tokens = [tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS]
    # the tiny model's tokenizer is the same one (same training corpus), so its processor files fit
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl", min_pixels=56 * 56, max_pixels=max_pixels)
    return ModelBundle(model=model, processor=proc, path=f"<random {shape}>", kind="qwen2_5_vl")
