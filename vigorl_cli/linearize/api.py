"""`vigorl linearize`: tree files → SFT data (single-turn chains and/or multi-turn zoom dialogs) + stats.

Output folder:

==========================================  =====================================================================
``reasoning_chains_train.json`` / ``_val``  single-turn sharegpt records (reference file names, §2.1)
``reasoning_chains.txt``                    every single-turn chain, separated as the reference does
``reasoning_chains_train_MULTITURN.json``   multi-turn records (and ``_val_MULTITURN``), image paths relative
                                            to this folder
``images/``                                 ``{tree}_full.png`` (the resized full image, once per tree) and
                                            ``{tree}_{chain}_{k}.png`` (the k-th crop of a dialog)
``stats.json``                              the numbers of the stats table
==========================================  =====================================================================

Trees are split 95/5 into train/val by tree (seeded shuffle, then the reference's ``int(n * 0.95)`` cut, at least
one training tree), so no question appears on both sides. Seeds: one per tree and chain, derived from the run seed
and the tree id, so the output does not depend on the order of the input files.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vigorl_cli.data.formats import SFTRecord, write_sft
from vigorl_cli.data.io import atomic_write_json, atomic_write_text, iter_files, read_json_or_jsonl
from vigorl_cli.engines.base import derive_seed
from vigorl_cli.errors import DataError
from vigorl_cli.linearize.multiturn import (
    MultiturnSettings,
    chain_to_dialog,
    linearizer_frame,
    rescale_coordinates,
    tree_dialog_chains,
    tree_dialogs,
    tree_frame,
)
from vigorl_cli.linearize.single import CHAIN_SEPARATOR, Chain, count_words, select_chains, sft_record, tree_chains
from vigorl_cli.models import prompts
from vigorl_cli.recipe import Recipe
from vigorl_cli.search.tree import TreeRecord

FORMATS = ("single", "multiturn", "both")


@dataclass
class LinearizeResult:
    stats: dict
    files: list[str] = field(default_factory=list)


def read_trees(paths: Iterable[str | Path]) -> tuple[list[TreeRecord], Counter]:
    """Tree records of every file (folders: their ``*.jsonl``), first record per id; skips are counted by reason."""
    skipped: Counter = Counter()
    trees: dict[str, TreeRecord] = {}
    for path in iter_files(paths, (".jsonl",)):
        res = read_json_or_jsonl(path)
        skipped["unreadable_line"] += len(res.errors)
        for _, d in res.records:
            if "error" in d:
                skipped["error_record"] += 1
                continue
            try:
                rec = TreeRecord.from_dict(d)
            except (ValueError, TypeError, KeyError):
                skipped["not_a_tree"] += 1
                continue
            if rec.id in trees:
                skipped["duplicate_id"] += 1
                continue
            trees[rec.id] = rec
    return list(trees.values()), +skipped


def split_train(trees: list[TreeRecord], val_fraction: float, seed: int) -> set[str]:
    """Ids of the training trees (seeded shuffle, then the reference's ``int(n * (1 - val))`` cut, at least 1)."""
    ids = [t.id for t in trees]
    random.Random(seed).shuffle(ids)
    n_train = max(1, int(len(ids) * (1 - val_fraction))) if ids else 0
    return set(ids[:n_train])


def _preset(rec: TreeRecord, override: str | None, recipe_preset: str) -> str:
    return override or rec.extra.get("preset") or recipe_preset


def _token_counter(model: str) -> tuple[Callable[[str], int], str]:
    """The model's tokenizer when it can be loaded offline, else whitespace words."""
    try:
        from transformers import AutoTokenizer

        from vigorl_cli.models.load import resolve_model

        path = resolve_model(model)
        if not Path(str(path)).exists():
            raise OSError("not local")
        tok = AutoTokenizer.from_pretrained(str(path))
        return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "tokens"
    except (OSError, ValueError, ImportError, KeyError):  # no local tokenizer: count words instead
        return count_words, "words"


def run_linearize(r: Recipe, inputs: list[str | Path], out: Path, fmt: str | None = None, select: str | None = None,
                  preset: str | None = None, on_tree: Callable[[int, int], None] | None = None) -> LinearizeResult:
    """Linearize the trees in ``inputs`` into ``out`` (``fmt``: single | multiturn | both)."""
    lc = r.linearize
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; use single, multiturn or both")
    select = select or lc.select
    trees, skipped = read_trees(inputs)
    if not trees:
        raise DataError(f"no trees found in {', '.join(map(str, inputs))}",
                        hint="pass the trees.jsonl files (or folders) written by `vigorl mcts`")
    n_mt = sum(_is_multiturn(t) for t in trees)
    if fmt is None:  # recipe default; trees that are all multi-turn can only become dialogs
        fmt = "multiturn" if n_mt == len(trees) else ("both" if lc.multiturn else "single")
    elif fmt == "single" and n_mt == len(trees):
        raise DataError(f"--format single: all {n_mt} trees were searched with mcts.mode: multiturn and become "
                        "multi-turn dialogs only", hint="use --format multiturn (or both)")
    out.mkdir(parents=True, exist_ok=True)
    train_ids = split_train(trees, lc.val_fraction, r.seed)
    count, count_unit = _token_counter(r.model.name)
    st = MultiturnSettings(zoom=r.tool.zoom(),
                           max_turns=r.tool.value("max_turns"), min_pixels=lc.min_pixels, max_pixels=lc.max_pixels,
                           shuffle_prob=lc.shuffle_prob)
    single: dict[str, list[SFTRecord]] = {"train": [], "val": []}
    multi: dict[str, list[SFTRecord]] = {"train": [], "val": []}
    texts: list[str] = []
    counts: Counter = Counter()
    mt_failures: Counter = Counter()
    tokens: list[int] = []
    for i, rec in enumerate(trees):
        side = "train" if rec.id in train_ids else "val"
        counts["trees"] += 1
        counts["trees_correct"] += rec.tree.value > 0  # reference's printed ratio
        p = _preset(rec, preset, r.prompt.preset)
        cap_rng = random.Random(derive_seed(r.seed, "cap", rec.id))
        if _is_multiturn(rec):
            counts["multiturn_trees"] += 1
            if fmt != "single":
                chains = select_chains(tree_dialog_chains(rec), select, lc.max_chains_per_tree,
                                       lc.max_corrected_per_tree, cap_rng)
                _multiturn_tree(rec, i, chains, out, prompts.system_prompt(p, "multiturn"), multi[side], counts,
                                mt_failures)
        else:
            chains = select_chains(tree_chains(rec, lc.backtrack_text, lc.compat), select, lc.max_chains_per_tree,
                                   lc.max_corrected_per_tree, cap_rng)
            counts["chains"] += len(chains)
            counts["corrected"] += sum(c.kind == "corrected" for c in chains)
            counts["trees_with_chains"] += bool(chains)
            tokens += [count(c.text) for c in chains]
            if fmt != "multiturn":
                sys_single = prompts.system_prompt(p, "single")
                single[side] += [sft_record(rec, c, sys_single, f"{i}_{j}") for j, c in enumerate(chains)]
                texts += [c.text for c in chains]
            if fmt != "single":
                _chain_dialogs(rec, i, chains, out, prompts.system_prompt(p, "multiturn"), st, r.seed, multi[side],
                               counts, mt_failures)
        if on_tree is not None:
            on_tree(i + 1, len(trees))

    files = []
    if fmt != "multiturn":
        for side in ("train", "val"):
            write_sft(out / f"reasoning_chains_{side}.json", single[side])
            files.append(str(out / f"reasoning_chains_{side}.json"))
        atomic_write_text(out / "reasoning_chains.txt", CHAIN_SEPARATOR.join(texts))
    if fmt != "single":
        for side in ("train", "val"):
            write_sft(out / f"reasoning_chains_{side}_MULTITURN.json", multi[side])
            files.append(str(out / f"reasoning_chains_{side}_MULTITURN.json"))
    n_single = counts["chains"]
    stats = {
        "trees": counts["trees"], "trees_correct": counts["trees_correct"],
        "trees_skipped": dict(skipped), "multiturn_trees": counts["multiturn_trees"],
        # --format single cannot use multi-turn trees (mixed inputs; all multi-turn is an error above)
        "multiturn_trees_unused": counts["multiturn_trees"] if fmt == "single" else 0,
        "chains": n_single, "chains_per_tree": round(n_single / max(1, counts["trees"] - counts["multiturn_trees"]), 3),
        "corrected_share": round(counts["corrected"] / n_single, 4) if n_single else 0.0,
        f"mean_{count_unit}": round(sum(tokens) / len(tokens), 1) if tokens else 0.0, "count_unit": count_unit,
        "single_train": len(single["train"]), "single_val": len(single["val"]),
        "dialogs": counts["dialogs"], "dialogs_shuffled": counts["shuffled"],
        "tool_calls_per_dialog": round(counts["tool_calls"] / counts["dialogs"], 3) if counts["dialogs"] else 0.0,
        "dialogs_dropped": dict(mt_failures),
        "multiturn_train": len(multi["train"]), "multiturn_val": len(multi["val"]),
        "format": fmt, "select": select,
    }
    atomic_write_json(out / "stats.json", stats)
    return LinearizeResult(stats, files)


def _open_image(rec: TreeRecord) -> Image.Image | None:
    try:
        with Image.open(rec.image) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None


def _save(img: Image.Image, out: Path, name: str) -> str:
    (out / "images").mkdir(parents=True, exist_ok=True)
    img.save(out / "images" / name)
    return f"images/{name}"


def _chain_dialogs(rec: TreeRecord, i: int, chains: list[Chain], out: Path, system_prompt: str,
                   st: MultiturnSettings, seed: int, dest: list[SFTRecord], counts: Counter, failures: Counter) -> None:
    """Post-hoc conversion of a single-turn tree's chains (reference §2.2)."""
    if not chains:
        return
    original = _open_image(rec)
    if original is None:
        failures["missing_image"] += len(chains)
        return
    frame, resized = linearizer_frame(original, st)
    src = tree_frame(rec, original.size)
    full = None
    for j, c in enumerate(chains):
        rng = random.Random(derive_seed(seed, "multiturn", rec.id, j))
        d = chain_to_dialog(rescale_coordinates(c.text, src, frame), rec.question, resized, frame, system_prompt,
                            st, rng)
        if isinstance(d, str):
            failures[d] += 1
            continue
        full = full or _save(resized, out, f"{i}_full.png")
        paths = [full] + [_save(im, out, f"{i}_{j}_{k}.png") for k, im in enumerate(d.images[1:], start=1)]
        dest.append(SFTRecord(id=f"{i}_{j}", messages=d.messages, images=paths, gt_answer=rec.true_answer,
                              metadata={"tree_id": rec.id, "kind": c.kind, "node": c.node, "shuffled": d.shuffled}))
        counts["dialogs"] += 1
        counts["shuffled"] += d.shuffled
        counts["tool_calls"] += d.n_calls


def _is_multiturn(rec: TreeRecord) -> bool:
    return rec.extra.get("mode") == "multiturn"


def _multiturn_tree(rec: TreeRecord, i: int, chains: list[Chain], out: Path, system_prompt: str,
                    dest: list[SFTRecord], counts: Counter, failures: Counter) -> None:
    """A tree searched with the zoom tool: its selected correct rollouts (``chains``) are dialogs already."""
    if not chains:
        return
    original = _open_image(rec)
    if original is None:
        failures["missing_image"] += len(chains)
        return
    dialogs, fails = tree_dialogs(rec, original, system_prompt, chains)
    failures.update(fails)
    full = None
    for j, (c, d) in enumerate(dialogs):
        full = full or _save(d.images[0], out, f"{i}_full.png")
        paths = [full] + [_save(im, out, f"{i}_{j}_{k}.png") for k, im in enumerate(d.images[1:], start=1)]
        dest.append(SFTRecord(id=f"{i}_{j}", messages=d.messages, images=paths, gt_answer=rec.true_answer,
                              metadata={"tree_id": rec.id, "kind": c.kind, "node": c.node,
                                        "source": "multiturn_tree"}))
        counts["dialogs"] += 1
        counts["tool_calls"] += d.n_calls


def summary_rows(stats: dict) -> list[list[Any]]:
    """Rows of the stats table."""
    unit = stats.get("count_unit", "tokens")
    rows = [["trees", stats["trees"]], ["trees with a correct rollout (root value > 0)", stats["trees_correct"]],
            ["chains", stats["chains"]], ["chains per tree", stats["chains_per_tree"]],
            ["share of corrected chains", f"{stats['corrected_share']:.1%}"],
            [f"mean {unit} per chain", stats.get(f"mean_{unit}", 0.0)],
            ["single-turn train / val", f"{stats['single_train']} / {stats['single_val']}"]]
    if stats["format"] != "single":
        rows += [["multi-turn dialogs", stats["dialogs"]], ["tool calls per dialog", stats["tool_calls_per_dialog"]],
                 ["dialogs with the first call moved", stats["dialogs_shuffled"]],
                 ["multi-turn train / val", f"{stats['multiturn_train']} / {stats['multiturn_val']}"]]
        if stats["dialogs_dropped"]:
            rows.append(["dialogs dropped", ", ".join(f"{k}: {v}" for k, v in stats["dialogs_dropped"].items())])
    if stats.get("multiturn_trees_unused"):
        rows.append(["multi-turn trees not used (--format single; use multiturn or both)",
                     stats["multiturn_trees_unused"]])
    if stats["trees_skipped"]:
        rows.append(["records skipped", ", ".join(f"{k}: {v}" for k, v in stats["trees_skipped"].items())])
    return rows
