"""`vigorl mcts`: reference semantics, driver independence (batched == sequential == async), resume after a kill,
per-sample errors, shards, multi-turn search, and the tree JSON schema."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter as CountBy
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vigorl_cli.cli.main import app
from vigorl_cli.data.formats import write_samples
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, SamplingParams, derive_seed
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.models import prompts
from vigorl_cli.models.load import load_processor
from vigorl_cli.models.tiny import tiny_path
from vigorl_cli.recipe import load_recipe
from vigorl_cli.search.api import RunStats, in_shard, run_mcts, search_samples
from vigorl_cli.search.mcts import (
    Counters,
    MCTSSettings,
    TreeSearch,
    drive_async,
    drive_batched,
    drive_sequential,
    merge_requests,
)
from vigorl_cli.search.tree import NODE_KEYS, RECORD_KEYS, ROLLOUT_KEYS, TreeNode, TreeRecord
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "<image>\nIs the star above or below the ball?\nA. above\nB. below"


@pytest.fixture(scope="module")
def proc():
    return load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")


class Teacher:
    """A seeded fake teacher: ``policy(request, rng) -> text``, sampled per request seed exactly as the HF engine
    seeds rows (``derive_seed(seed, k)`` for sample k of an ``n > 1`` request). Counts calls and rows."""

    name = "teacher"

    def __init__(self, tok, policy, fail_after: int | None = None, delay: float = 0.0):
        self.tok, self.policy, self.fail_after, self.delay = tok, policy, fail_after, delay
        self.calls = self.rows = 0

    def _one(self, r):
        out = []
        for k in range(r.params.n):
            seed = derive_seed(r.params.seed, k) if r.params.n > 1 else r.params.seed
            text = self.policy(r, random.Random(seed))
            self.rows += 1
            if text is None:
                out.append(Completion([], "", None, "error", error="boom"))
            else:
                out.append(Completion(self.tok(text, add_special_tokens=False)["input_ids"], text, None, "stop", "eos"))
        return out

    def generate(self, requests):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")  # what a kill looks like from inside: nothing after this is written
        time.sleep(self.delay)
        return [self._one(r) for r in requests]

    def close(self):
        pass


class AsyncTeacher(Teacher):
    async def agenerate(self, request):
        await asyncio.sleep(0)
        return self._one(request)


def forced(r) -> bool:
    return r.messages[-1]["content"] == prompts.FORCE_FINAL_TEXT


def spatial_policy(r, rng):
    """Thoughts over four points (so repeats happen), answers (with and without option letter), forced answers."""
    if forced(r) or rng.random() < 0.25:
        return rng.choice(["<answer> above </answer>", "<answer> B. below </answer>", "<answer> A. above </answer>"])
    x, y = rng.choice([(10, 20), (30, 40), (50, 12), (20, 50)])
    return f"<think>\nThe star is near ({x}, {y}).\n</think>"


def _searches(proc, n=3, policy_mode="singleturn", max_new_tokens=16, **kw):
    st = MCTSSettings(sampling=SamplingParams(max_new_tokens=max_new_tokens), mode=policy_mode, seed=7,
                      zoom=ZoomTool(offset=10, crop_size=28, draw_dot=False), **kw)
    for i in range(n):
        s = Sample(id=f"s{i}", images=["x.png"], question=QUESTION, answer="above")
        yield TreeSearch(s, Image.new("RGB", (56, 56), (i * 40, 90, 90)), Frame.identity(56, 56), proc, st, "x.png")


def _run(driver, engine, searches, **kw):
    """{id: tree record} built by ``driver``."""
    recs = []
    driver(engine, searches, lambda t: recs.append(t.tree_record().to_dict() if t.error is None else t.error_record()),
           **kw)
    return {r["id"]: r for r in recs}


def untimed(recs: dict) -> dict:
    """Records without their wall-clock fields (the only ones allowed to differ between drivers)."""
    return {i: {k: v for k, v in r.items() if k not in ("global_search_time", "timings")} for i, r in recs.items()}


def json_out(text: str):
    """The JSON a command printed (a library may log a line to stdout before it)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("{") or line == "[")
    return json.loads("\n".join(lines[start:]))


def _walk(node):
    yield node
    for c in node["children"]:
        yield from _walk(c)


def assert_reference_schema(rec: dict) -> None:
    """The reference tree JSON (§1.7): record keys, node keys, rollout keys, consistent statistics."""
    for k in (*RECORD_KEYS, "tree"):
        assert k in rec, k
    assert rec["tree"]["thought_text"] == rec["question"]
    for node in _walk(rec["tree"]):
        assert list(node)[:len(NODE_KEYS)] == list(NODE_KEYS)
        assert 0.0 <= node["value"] <= 1.0 and node["visit_count"] >= len(node["rollouts"])
        assert isinstance(node["used_coords"], list)
        for c in node["children"]:
            assert set(node["used_coords"]) <= set(c["used_coords"])
        for ro in node["rollouts"]:
            assert list(ro)[:len(ROLLOUT_KEYS)] == list(ROLLOUT_KEYS)
            assert ro["reward"] in (0.0, 1.0) and ro["ephemeral_texts"][0] == rec["question"]
    # every rollout is one backprop through the root (plus re-visits of terminal leaves)
    n_rollouts = sum(len(n["rollouts"]) for n in _walk(rec["tree"]))
    assert rec["tree"]["visit_count"] >= n_rollouts
    Frame.from_dict(rec["frame"])


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

def test_mcts_cli_on_demo_data_writes_reference_schema_trees(demo_root, tmp_path):
    out = tmp_path / "mcts"
    args = ["mcts", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--out", str(out), "--data-root", str(demo_root),
            "--limit", "3", "--set", "mcts.sampling.max_new_tokens=8", "--set", "mcts.rollout_max_steps=2",
            "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json_out(res.stdout)
    assert summary["trees"] == 3 and summary["errors"] == {} and summary["steps"] > 0
    recs = [json.loads(line) for line in (out / "trees.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in recs}) == 3
    for rec in recs:
        assert_reference_schema(rec)
        assert rec["image"].endswith(".png") and Path(rec["image"]).is_file()
        assert "at least" in rec["system_prompt"] and rec["tree"]["visit_count"] > 0
    assert (out / "manifest.json").is_file() and (out / "summary.json").is_file()
    # a rerun finds nothing to do and writes nothing twice
    res = CliRunner().invoke(app, args)
    assert json_out(res.stdout)["new_trees"] == 0
    assert len((out / "trees.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------------------------
# Reference semantics (scripted teacher)
# ---------------------------------------------------------------------------------------------------------------

def test_expansion_skips_repeated_coordinates_and_answers_become_terminal_children(proc):
    # Simulation 1 expands the root: A (10, 20), an answer "B. below", C (10,20) written without the space.
    # Simulation 2 expands A (the best child): a child repeating (10, 20) (written as "(10,20)") is dropped.
    def policy(r, rng):
        text = r.messages[1]["content"][1]["text"]
        k = int(r.request_id.rsplit("/", 1)[1]) if r.params.n == 1 else None
        if "Previous thought" not in text and "/expand/" in r.request_id:
            return ["<think>\nA (10, 20).\n</think>", "<answer> B. below </answer>", "<think>\nC (30,40).\n</think>"][k]
        if "/expand/" in r.request_id:
            return ["<think>\nagain (10,20)\n</think>", "<think>\nnew (5, 5)\n</think>", "<answer> above </answer>"][k]
        return "<answer> above </answer>"  # every rollout step answers right away

    st = MCTSSettings(simulations=2, sampling=SamplingParams(max_new_tokens=8), seed=1)
    t = TreeSearch(Sample(id="q", images=["x.png"], question=QUESTION, answer="above"), Image.new("RGB", (56, 56)),
                   Frame.identity(56, 56), proc, st)
    drive_sequential(Teacher(proc.tokenizer, policy), [t], lambda _: None)
    root = t.root
    a, b, c = root.children
    assert (a.thought_text, b.thought_text, b.is_terminal) == ("<think>\nA (10, 20).\n</think>", "below", True)
    assert b.rollouts[0].ephemeral_texts == [QUESTION, "below"] and b.rollouts[0].reward == 0.0
    assert a.used_coords == ["(10, 20)"] and c.used_coords == ["(30,40)"]
    # after simulation 1: 3 children x 2 rollouts = 6 root visits; A and C answered "above" (1), B "below" (0)
    # -> A.value = C.value = 1, B.value = 0; UCB picks A (first of the tied best) for simulation 2
    assert [ch.thought_text for ch in a.children] == ["<think>\nnew (5, 5)\n</think>", "above"]
    assert t.stats["skipped_repeats"] == 1
    assert a.children[0].used_coords == ["(10, 20)", "(5, 5)"]
    # simulation 2 adds 2 children x 2 rollouts, all correct: root 6 + 4 = 10 visits, value (4 + 4) / 10
    assert root.visit_count == 10 and root.value == pytest.approx(0.8)
    assert a.visit_count == 6 and a.value == pytest.approx(1.0)


def test_rollouts_force_the_final_answer_on_their_last_step_and_unanswered_rollouts_score_zero(proc):
    seen_forced = []

    def policy(r, rng):
        n_prev = r.messages[1]["content"][1]["text"].count("Previous thought")
        seen_forced.append((n_prev, forced(r)))
        return "<think>\nstill looking\n</think>"  # never answers, even when told to

    st = MCTSSettings(simulations=1, children_per_expand=1, rollouts_per_node=1, rollout_max_steps=3, seed=1,
                      sampling=SamplingParams(max_new_tokens=8))
    t = TreeSearch(Sample(id="q", images=["x.png"], question=QUESTION, answer="above"), Image.new("RGB", (56, 56)),
                   Frame.identity(56, 56), proc, st)
    drive_sequential(Teacher(proc.tokenizer, policy), [t], lambda _: None)
    # expansion (0 previous thoughts), then rollout steps with 1, 2, 3 previous thoughts; only the last is forced
    assert seen_forced == [(0, False), (1, False), (2, False), (3, True)]
    ro = t.root.children[0].rollouts[0]
    assert (ro.depth, ro.ephemeral_depth, ro.reward, ro.extra["failure"]) == (3, 4, 0.0, "no_answer")


def _node(value, visits, children=()):
    n = TreeNode("<think>\nx\n</think>", value=value, visit_count=visits)
    for c in children:
        n.add_child(c)
    return n


def test_selection_follows_ucb_with_the_plus_one_terms_and_c_2(proc):
    st = MCTSSettings(sampling=SamplingParams(max_new_tokens=8), seed=1)  # c_puct = 2.0
    t = TreeSearch(Sample(id="q", images=["x.png"], question=QUESTION, answer="above"), Image.new("RGB", (56, 56)),
                   Frame.identity(56, 56), proc, st)
    # root N = 13; children (value, visits) = (0.8, 8), (0.4, 3), (0.0, 2). UCB = Q + 2*sqrt(ln(N+1)/(n+1)),
    # ln 14 = 2.639057:
    #   c0: 0.8 + 2*sqrt(2.639057/9) = 0.8 + 2*0.541506 = 1.8830
    #   c1: 0.4 + 2*sqrt(2.639057/4) = 0.4 + 2*0.812259 = 2.0245   <- the reference's formula picks c1
    #   c2: 0.0 + 2*sqrt(2.639057/3) = 0.0 + 2*0.937916 = 1.8758
    # Wrong formulas pick another child:
    #   no +1 terms, Q + 2*sqrt(ln N / n), ln 13 = 2.564949: c0 1.9325, c1 2.2493, c2 2.2649 -> c2
    #   c = 1.4 (the reference constructor's default): c0 1.5581, c1 1.5372, c2 1.3131 -> c0
    #   greedy on Q -> c0; fewest visits -> c2
    # c1 has a child that was never visited, so selection stops at c1 (it is expanded next).
    c1 = _node(0.4, 3, [_node(1.0, 2), _node(0.0, 0)])
    t.root.value, t.root.visit_count = 0.5, 13
    for c in (_node(0.8, 8), c1, _node(0.0, 2)):
        t.root.add_child(c)
    assert t._select() == [t.root, c1]
    # with every grandchild visited the walk goes on: (1.0, 2) vs (0.0, 1) under N = 3, ln 4 = 1.386294:
    # 1.0 + 2*sqrt(1.386294/3) = 2.3595 vs 0.0 + 2*sqrt(1.386294/2) = 1.6651 -> the first
    c1.children[1].visit_count = 1
    assert t._select() == [t.root, c1, c1.children[0]]
    # a root with an unvisited child stops at the root
    t.root.add_child(_node(0.0, 0))
    assert t._select() == [t.root]


def _limit_policy(mode, log):
    """Answers "above" exactly when the step is forced, else a thought with a new coordinate (a tool call in
    multi-turn mode); logs (kind of request, forced)."""
    count = [0]

    def policy(r, rng):
        is_forced = forced(r) if mode == "singleturn" else bool(r.messages[-1].get("prefix"))
        log.append(("expand" if "/expand/" in r.request_id else "rollout", is_forced))
        if is_forced:
            return "<answer> above </answer>" if mode == "singleturn" else " above </answer>"
        count[0] += 1
        x, y = 4 + 6 * count[0], 30
        if mode == "singleturn":
            return f"<think>\nlook at ({x}, {y})\n</think>"
        return f"<think> look at ({x}, {y}) </think>\n" + prompts.tool_call_text(x, y)
    return policy


@pytest.mark.parametrize("mode", ["singleturn", "multiturn"])
def test_rollout_and_expansion_at_max_depth_are_forced_to_answer(proc, mode):
    # max_depth 2, one child per expansion, one rollout per child, rollout_max_steps 5 (never the binding limit):
    # sim 1: expand the root (depth 0 < 2: free) -> A (depth 1); A's rollout starts at ephemeral depth 1 and its
    #        first step reaches depth 2 = max_depth: forced (edepth == max_depth - 1) -> answers, reward 1
    # sim 2: root -> A (its only child); A is a leaf at depth 1: free expansion -> B (depth 2); B's rollout cannot
    #        take a step (ephemeral depth 2 is not < max_depth): no answer, reward 0
    # sim 3: root -> A -> B; B is at depth 2 >= max_depth: its expansion is forced -> terminal child "above"
    log: list = []
    st = MCTSSettings(simulations=3, max_depth=2, children_per_expand=1, rollouts_per_node=1, rollout_max_steps=5,
                      sampling=SamplingParams(max_new_tokens=8), seed=1, mode=mode,
                      zoom=ZoomTool(offset=10, crop_size=28, draw_dot=False))
    t = TreeSearch(Sample(id="q", images=["x.png"], question=QUESTION, answer="above"), Image.new("RGB", (56, 56)),
                   Frame.identity(56, 56), proc, st)
    drive_sequential(Teacher(proc.tokenizer, _limit_policy(mode, log)), [t], lambda _: None)
    assert t.error is None
    assert log == [("expand", False), ("rollout", True), ("expand", False), ("expand", True)]
    a = t.root.children[0]
    b = a.children[0]
    term = b.children[0]
    assert [n.depth for n in (a, b, term)] == [1, 2, 3] and term.is_terminal and not b.is_terminal
    ro_a, ro_b, ro_t = a.rollouts[0], b.rollouts[0], term.rollouts[0]
    assert (ro_a.reward, ro_a.final_answer, ro_a.depth, ro_a.ephemeral_depth) == (1.0, "above", 1, 2)
    assert (ro_b.reward, ro_b.extra["failure"], ro_b.depth) == (0.0, "no_answer", 0)
    assert ro_t.reward == 1.0
    if mode == "multiturn":
        # the forced turns start with the episode's forced-answer prefix; B's conversation was not changed by it
        assert ro_a.ephemeral_texts[-1] == prompts.FORCED_ANSWER_PREFIX + " above </answer>"
        assert term.thought_text == prompts.FORCED_ANSWER_PREFIX + " above </answer>"
        assert term.extra["finish"] == "answered" and not b.state.done and b.state._pending_prefix == ""
        assert [c["turn"] for c in ro_a.extra["crops"]] == [1]
    else:
        assert term.thought_text == "above" and ro_a.ephemeral_texts[-1] == "<answer> above </answer>"


def test_multiturn_rollouts_force_the_final_answer_on_their_last_step(proc):
    log: list = []
    st = MCTSSettings(simulations=1, children_per_expand=1, rollouts_per_node=1, rollout_max_steps=3, seed=1,
                      sampling=SamplingParams(max_new_tokens=8), mode="multiturn", max_images=10,
                      zoom=ZoomTool(offset=10, crop_size=28, draw_dot=False))
    t = TreeSearch(Sample(id="q", images=["x.png"], question=QUESTION, answer="above"), Image.new("RGB", (56, 56)),
                   Frame.identity(56, 56), proc, st)
    drive_sequential(Teacher(proc.tokenizer, _limit_policy("multiturn", log)), [t], lambda _: None)
    # expansion, then rollout steps 1, 2, 3: only the last (rollout_max_steps - 1 = 2 steps taken) is forced
    assert log == [("expand", False), ("rollout", False), ("rollout", False), ("rollout", True)]
    ro = t.root.children[0].rollouts[0]
    assert (ro.depth, ro.ephemeral_depth, ro.reward, ro.final_answer) == (3, 4, 1.0, "above")
    assert ro.ephemeral_texts[-1].startswith(prompts.FORCED_ANSWER_PREFIX) and "failure" not in ro.extra
    assert [c["turn"] for c in ro.extra["crops"]] == [1, 2, 3]  # the three tool-call turns before the answer


# ---------------------------------------------------------------------------------------------------------------
# The result does not depend on the driver
# ---------------------------------------------------------------------------------------------------------------

def test_batched_and_sequential_drivers_build_identical_trees_with_the_seeded_hf_engine(tiny_bundle):
    # one simulation: an expansion (one n=2 request when batched) and 2 x 2 rollouts of 2 steps (the first steps of
    # a child's rollouts share one n=2 request); two trees with different image sizes share every batch
    kw = {"simulations": 1, "children_per_expand": 2, "rollouts_per_node": 2, "rollout_max_steps": 2,
          "system_prompt": "Think.", "max_new_tokens": 6}
    seq_engine, bat_engine = HFEngine(tiny_bundle, batch_size=64), HFEngine(tiny_bundle, batch_size=64)
    seq = _run(drive_sequential, seq_engine, _searches(tiny_bundle.processor, n=2, **kw))
    bat = _run(drive_batched, bat_engine, _searches(tiny_bundle.processor, n=2, **kw), in_flight=2)
    assert untimed(seq) == untimed(bat) and len(seq) == 2
    assert all(r["stats"]["steps"] > 4 for r in seq.values())


def test_batched_async_and_sequential_drivers_agree_and_batching_cuts_engine_calls(proc):
    seq_t, bat_t, asy_t = (Teacher(proc.tokenizer, spatial_policy), Teacher(proc.tokenizer, spatial_policy),
                           AsyncTeacher(proc.tokenizer, spatial_policy))
    seq = _run(drive_sequential, seq_t, _searches(proc, simulations=4))
    bat = _run(drive_batched, bat_t, _searches(proc, simulations=4), in_flight=3)
    asy = _run(drive_async, asy_t, _searches(proc, simulations=4), in_flight=3)
    assert untimed(seq) == untimed(bat) == untimed(asy)
    assert seq_t.rows == bat_t.rows and bat_t.calls < seq_t.calls / 3  # same work, far fewer engine calls
    assert any(r["root_correct"] for r in seq.values()) and any(r["stats"]["skipped_repeats"] for r in seq.values())
    for rec in seq.values():
        assert_reference_schema(rec)


def test_expansion_samples_share_one_request_with_n_and_the_same_seeds(proc):
    t = next(_searches(proc, n=1))
    wave = t.start()
    reqs, sizes = merge_requests(wave)
    # one expansion of the root: 3 samples -> one request, n=3, seeded with the group's base seed;
    # sample k of it gets derive_seed(base, k): the seed of the k-th single request
    assert sizes == [3] and reqs[0].params.n == 3 and reqs[0].params.seed == wave[0].base_seed
    assert [g.request.params.seed for g in wave] == [derive_seed(wave[0].base_seed, k) for k in range(3)]
    assert merge_requests(wave, group_n=False)[1] == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Resume, errors, shards
# ---------------------------------------------------------------------------------------------------------------

def _write_data(tmp_path, n=5, missing=()):
    samples = []
    for i in range(n):
        if f"s{i}" not in missing:
            Image.new("RGB", (56, 56), (i * 30, 80, 80)).save(tmp_path / f"s{i}.png")
        samples.append(Sample(id=f"s{i}", images=[f"s{i}.png"], question=QUESTION, answer="above"))
    write_samples(tmp_path / "mcts.jsonl", samples, "llava")
    return samples


def _settings(**kw):
    return MCTSSettings(simulations=3, sampling=SamplingParams(max_new_tokens=8), seed=3, **kw)


def test_resumed_mcts_run_produces_same_trees_with_none_lost_or_duplicated(proc, tmp_path):
    samples = _write_data(tmp_path)
    full = tmp_path / "full"
    teacher = Teacher(proc.tokenizer, spatial_policy)
    search_samples(samples, teacher, proc, _settings(), full, tmp_path, in_flight=2)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):  # killed half way: some trees done, others in flight
        search_samples(samples, Teacher(proc.tokenizer, spatial_policy, fail_after=teacher.calls // 2), proc,
                       _settings(), part, tmp_path, in_flight=2)
    before = (part / "trees.jsonl").read_text().splitlines()
    assert 0 < len(before) < 5
    with open(part / "trees.jsonl", "a") as f:
        f.write('{"question": "torn li')  # a kill mid-write leaves a torn last line
    summary = search_samples(samples, Teacher(proc.tokenizer, spatial_policy), proc, _settings(), part, tmp_path,
                             in_flight=2)
    after = (part / "trees.jsonl").read_text().splitlines()
    assert after[:len(before)] == before and summary["new_trees"] == 5 - len(before)

    def trees(path):
        recs = [json.loads(line) for line in (path / "trees.jsonl").read_text().splitlines()]
        return {r["id"]: {k: v for k, v in r.items() if k not in ("global_search_time", "timings")} for r in recs}

    assert len(after) == 5 and trees(part) == trees(full)


def test_killed_cli_run_resumes_without_losing_or_duplicating_a_tree(demo_root, tmp_path, tiny_bundle):
    out = tmp_path / "mcts"
    sets = ["mcts.trees_in_flight=1", "mcts.simulations=1", "mcts.sampling.max_new_tokens=8",
            "mcts.rollout_max_steps=2"]
    args = ["mcts", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--out", str(out), "--data-root", str(demo_root),
            "--limit", "3"] + [a for kv in sets for a in ("--set", kv)]
    env = dict(os.environ, VIGORL_QUIET="1")
    p = subprocess.Popen([sys.executable, "-m", "vigorl_cli", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=ROOT)
    trees = out / "trees.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if trees.exists() and trees.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = trees.read_text().splitlines(keepends=True)
    complete = [line for line in before if line.endswith("\n")]
    assert len(complete) >= 1  # (on a fast machine the kill may land late; resume must still be exact)
    # resume (in-process, reusing the loaded tiny model)
    r = load_recipe(ROOT / "recipes" / "demo.yaml", sets)
    summary = run_mcts(r, out=out, data_root=demo_root, limit=3, bundle=tiny_bundle)
    assert summary["trees"] == 3 and summary["new_trees"] == 3 - len(complete)
    ids = [json.loads(line)["id"] for line in trees.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3
    assert trees.read_text().startswith("".join(complete))


def test_failed_samples_are_recorded_with_their_kind_and_retried_by_a_rerun(proc, tmp_path):
    samples = _write_data(tmp_path, n=4, missing=("s1",))

    def policy(r, rng):
        if r.request_id.startswith("s2/"):
            return None  # the engine fails this sample's requests
        return spatial_policy(r, rng)

    out = tmp_path / "out"
    summary = search_samples(samples, Teacher(proc.tokenizer, policy), proc, _settings(), out, tmp_path)
    errors = {json.loads(line)["id"]: json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()}
    assert errors["s1"]["error"] == "image_error" and errors["s2"]["error"] == "engine_error"
    assert summary["trees"] == 2 and summary["errors"] == {"image_error": 1, "engine_error": 1}
    slow = search_samples(samples, Teacher(proc.tokenizer, spatial_policy, delay=0.05), proc,
                          _settings(timeout_s=0.01), out, tmp_path)
    assert slow["errors"] == {"image_error": 1, "timeout": 1}  # s2 retried (and timed out); s0, s3 not redone
    last = json.loads((out / "errors.jsonl").read_text().splitlines()[-1])
    assert last["id"] == "s2" and last["timeout_seconds"] == 0.01


def test_mcts_sample_limit_is_cli_limit_then_mcts_max_samples_then_data_max_samples(proc, tmp_path, monkeypatch):
    from vigorl_cli.engines import factory

    _write_data(tmp_path, n=5)
    monkeypatch.setattr(factory, "make_engine", lambda *a, **k: (Teacher(proc.tokenizer, spatial_policy), proc))
    r = load_recipe(None, ["mcts.simulations=1", "mcts.sampling.max_new_tokens=8", "data.max_samples=4"])
    r.data.mcts = ["mcts.jsonl"]

    def trees(**kw):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        return run_mcts(r, out=out, data_root=tmp_path, **kw)["trees"]

    assert trees() == 4  # data.max_samples
    r.mcts.max_samples = 2
    assert trees() == 2  # mcts.max_samples overrides data.max_samples (it was ignored: 4)
    assert trees(limit=3) == 3  # --limit overrides both
    r.mcts.max_samples, r.data.max_samples = None, None
    assert trees() == 5


class SlowAsyncTeacher(AsyncTeacher):
    """Requests of the samples in ``slow`` take ``delay`` seconds (a hung server); counts cancelled requests."""

    def __init__(self, tok, policy, slow=(), delay=0.0):
        super().__init__(tok, policy)
        self.slow, self.slow_delay, self.cancelled = set(slow), delay, 0

    async def agenerate(self, request):
        if request.request_id.split("/")[0] in self.slow:
            try:
                await asyncio.sleep(self.slow_delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return await super().agenerate(request)


def test_async_driver_cancels_a_tree_whose_request_runs_past_the_timeout_and_a_rerun_retries_it(proc, tmp_path):
    samples = _write_data(tmp_path, n=2)
    out = tmp_path / "out"
    # s1's first request hangs for 20 s; the timeout is 2 s. Checking only between waves, the tree would end (as a
    # timeout) after the 20 s request returned; the async driver cancels the request when the tree's time is up.
    teacher = SlowAsyncTeacher(proc.tokenizer, spatial_policy, slow={"s1"}, delay=20.0)
    t0 = time.monotonic()
    summary = search_samples(samples, teacher, proc, _settings(timeout_s=2.0), out, tmp_path, in_flight=2)
    took = time.monotonic() - t0
    assert summary["errors"] == {"timeout": 1} and summary["trees"] == 1 and took < 10.0
    assert teacher.cancelled == 1  # the hung request was cancelled, not left running
    err = json.loads((out / "errors.jsonl").read_text())
    assert err["id"] == "s1" and err["error"] == "timeout" and err["timeout_seconds"] == 2.0
    assert 2.0 <= err["global_search_time"] < 10.0
    # resumable: a rerun with a healthy server searches s1 only
    rerun = search_samples(samples, AsyncTeacher(proc.tokenizer, spatial_policy), proc, _settings(timeout_s=60.0),
                           out, tmp_path, in_flight=2)
    assert rerun["new_trees"] == 1 and rerun["trees"] == 2 and rerun["errors"] == {}


def test_run_stats_line_numbers_are_hand_computed():
    st = RunStats(total=10, done=5, correct=3, errors=CountBy({"timeout": 1}), counters=Counters(250, 5000), t0=100.0)
    # 10 s elapsed: 250 / 10 = 25.0 nodes/s, 5000 / 10 = 500 tok/s; 5 done - 1 error = 4 trees, 3 correct -> 75 %
    assert st.trees == 4
    assert st.line(now=110.0) == "25.0 nodes/s · 500 tok/s · root acc 75% · 1 errors"
    assert RunStats(t0=0.0).line(now=4.0) == "0.0 nodes/s · 0 tok/s · root acc 0%"


class FixedTokenTeacher:
    """Thoughts cost 5 tokens, answers 3; s0 answers right ("above"), every other sample wrong ("below")."""

    name = "fixed"

    def generate(self, requests):
        out = []
        for r in requests:
            if forced(r):
                text = "<answer> above </answer>" if r.request_id.startswith("s0/") else "<answer> below </answer>"
                out.append([Completion([1, 2, 3], text, None, "stop", "eos")] * r.params.n)
            else:
                out.append([Completion([1, 2, 3, 4, 5], "<think>\nlook (10, 20)\n</think>", None, "stop", "eos")]
                           * r.params.n)
        return out


def test_progress_stats_of_a_run_count_trees_steps_tokens_and_root_accuracy(proc, tmp_path):
    samples = _write_data(tmp_path, n=3, missing=("s1",))
    seen: list = []
    st = MCTSSettings(simulations=1, children_per_expand=1, rollouts_per_node=1, rollout_max_steps=1, seed=3,
                      sampling=SamplingParams(max_new_tokens=8))
    summary = search_samples(samples, FixedTokenTeacher(), proc, st, tmp_path / "out", tmp_path,
                             on_progress=lambda s: seen.append((s, s.done, s.correct)))
    stats = seen[-1][0]
    # per tree: one expansion step (a 5-token thought) + one forced rollout step (a 3-token answer) = 2 steps, 8 tokens;
    # s0 and s2 are searched (4 steps, 16 tokens), s1 has no image (an error, not a tree); s0 is right, s2 wrong
    assert (stats.total, stats.done, stats.trees, stats.correct) == (3, 3, 2, 1)
    assert dict(stats.errors) == {"image_error": 1}
    assert (stats.counters.steps, stats.counters.tokens) == (4, 16)
    # 2 s after start: 4 / 2 = 2.0 nodes/s, 16 / 2 = 8 tok/s, 1 of 2 trees correct = 50 % (the summary's accuracy)
    assert stats.line(now=stats.t0 + 2.0) == "2.0 nodes/s · 8 tok/s · root acc 50% · 1 errors"
    assert summary["root_accuracy"] == 0.5 and (summary["steps"], summary["tokens"]) == (4, 16)
    dones = [d for _, d, _ in seen]  # reported after every wave and every finished sample
    assert dones == sorted(dones) and dones[-1] == 3 and 1 in dones


def test_shards_split_the_ids_into_disjoint_parts_and_write_their_own_files(proc, tmp_path):
    ids = [f"id-{i}" for i in range(200)]
    parts = [{i for i in ids if in_shard(i, (k, 3))} for k in range(3)]
    assert sum(len(p) for p in parts) == 200 and set().union(*parts) == set(ids) and all(len(p) > 40 for p in parts)
    samples = _write_data(tmp_path, n=4)
    out = tmp_path / "out"
    for k in range(2):
        search_samples(samples, Teacher(proc.tokenizer, spatial_policy), proc, _settings(), out, tmp_path,
                       shard=(k, 2))
    got = [json.loads(line)["id"] for k in range(2)
           for line in (out / f"trees.shard-{k}-of-2.jsonl").read_text().splitlines()]
    assert sorted(got) == [s.id for s in samples]


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn search and the schema
# ---------------------------------------------------------------------------------------------------------------

def multiturn_policy(r, rng):
    if r.messages[-1].get("prefix"):  # the forced-answer prefix is pending: finish the answer
        return " above </answer>"
    if rng.random() < 0.3:
        return rng.choice(["<think> seen </think>\n<answer> above </answer>", "<think> hm </think>\n<answer> below </answer>"])
    x, y = rng.choice([(10, 20), (30, 40), (50, 50), (20, 5)])
    return f"<think> look at ({x}, {y}) </think>\n" + prompts.tool_call_text(x, y)


def test_multiturn_search_feeds_crops_back_and_records_them_for_linearization(proc):
    kw = {"simulations": 3, "policy_mode": "multiturn"}
    seq = _run(drive_sequential, Teacher(proc.tokenizer, multiturn_policy), _searches(proc, n=2, **kw))
    bat = _run(drive_batched, Teacher(proc.tokenizer, multiturn_policy), _searches(proc, n=2, **kw), in_flight=2)
    assert untimed(seq) == untimed(bat)
    rec = seq["s0"]
    assert rec["mode"] == "multiturn" and rec["tool"]["offset"] == 10 and "search_coordinate" in rec["system_prompt"]
    nodes = list(_walk(rec["tree"]))[1:]
    with_crop = [n for n in nodes if "crop" in n]
    assert with_crop and all("<tool_call>" in n["thought_text"] for n in with_crop)
    for n in with_crop:  # the crop's point is the tool call's coordinate, in the tree's frame
        assert f"[{n['crop']['point'][0]}, {n['crop']['point'][1]}]" in n["thought_text"]
    rollouts = [ro for n in nodes for ro in n["rollouts"]]
    assert any(ro["reward"] == 1.0 for ro in rollouts)
    for ro in rollouts:  # every turn that called the tool is listed with its point
        turns = {c["turn"] for c in ro["crops"]}
        assert turns == {k for k, t in enumerate(ro["ephemeral_texts"]) if k and "<tool_call>" in t}


def test_tree_records_round_trip_for_reference_trees_and_ours(proc):
    reference = {"question": QUESTION, "image": "/data/x.png", "true_answer": "above", "system_prompt": "S",
                 "global_search_time": 12.5, "id": "7",
                 "tree": {"thought_text": QUESTION, "is_terminal": False, "value": 0.5, "visit_count": 2,
                          "used_coords": [], "rollouts": [],
                          "children": [{"thought_text": "<think>\nA (1, 2).\n</think>", "is_terminal": False,
                                        "value": 0.5, "visit_count": 2, "used_coords": ["(1, 2)"],
                                        "rollouts": [{"final_answer": "above", "reward": 1.0,
                                                      "ephemeral_texts": [QUESTION, "<think>\nA (1, 2).\n</think>",
                                                                          "<answer> above </answer>"],
                                                      "ephemeral_depth": 2, "depth": 1, "num_same_points": 0,
                                                      "num_different_points": 0}],
                                        "children": []}]}}
    rec = TreeRecord.from_dict(reference)
    assert rec.to_dict() == reference and json.dumps(rec.to_dict()) == json.dumps(reference)
    assert rec.tree.children[0].path_id == "0" and rec.root_correct and rec.n_nodes() == 1
    ours = next(iter(_run(drive_batched, Teacher(proc.tokenizer, spatial_policy), _searches(proc, n=1)).values()))
    assert TreeRecord.from_dict(ours).to_dict() == ours
    with pytest.raises(ValueError):
        TreeRecord.from_dict({"id": "x", "error": "timeout"})
