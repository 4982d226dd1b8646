"""MCTS over grounded thought steps (reference §1.3–§1.7), written so that many trees search at once.

**The algorithm** is the reference's (``MonteCarloTreeSearch.search``), per sample::

    root = question
    for each of `simulations`:
        path = select(root)             # walk by Q + c·sqrt(ln(N_parent+1)/(n+1)); stop at a terminal node, a leaf,
                                        # or a node with an unvisited child
        if leaf is terminal: judge it (once), backprop its value, next simulation
        children = expand(leaf)         # `children_per_expand` samples of ONE thought step; an answer becomes a
                                        # terminal child; a thought that repeats a coordinate of its path is skipped
        for child in children, for r in range(`rollouts_per_node`):
            rollout(child)              # up to `rollout_max_steps` more steps, forced final answer on the last one
                                        # (or at max_depth); 0/1 judge reward; stored on the child
            backprop(path + [child], reward)   # incremental mean, one backprop per rollout

A thought step is ONE generation with the reference prompt layout: system prompt (+ "at least N thoughts", N drawn
once per sample), one user message holding the image and ``question + "\\n\\nPrevious thought k: ..."`` for every
thought on the path; when forced, a second user message ``FORCE_FINAL_TEXT``. No stop strings (``mcts.stop``).

**How it is driven.** A :class:`TreeSearch` is a generator-based state machine: it *yields* the generations it
needs next (a "wave": the `children_per_expand` samples of an expansion, or one step of every rollout of the
simulation, which are independent of each other) and is *sent* their completions. Nothing inside a search waits for
an engine, so drivers are free to batch:

* :func:`drive_batched`: keeps ``trees_in_flight`` searches open and sends the waves of all of them to
  ``engine.generate`` in ONE call (HF: batched ``generate``; vLLM: one ``LLM.generate``); samples of one expansion
  go out as one request with ``n = children_per_expand`` (the prompt and the image are processed once);
* :func:`drive_async`: async engines (OpenAI-compatible pool): ``trees_in_flight`` searches as tasks, each sending its
  wave as concurrent requests, with no barrier between trees;
* :func:`drive_sequential`: one search, one request, ``n = 1`` at a time: the reference's request pattern (used by
  the tests and the throughput benchmark as the baseline).

**The result does not depend on the driver.** Every generation carries its own seed, derived from
``(run seed, sample id, node path, expansion attempt, k)`` (expansions) or ``(run seed, sample id, child path,
rollout, step)`` (rollouts), and an ``n > 1`` request seeds its k-th sample exactly as the k-th ``n = 1`` request
(``derive_seed(base, k)``, the engines' rule). Rollouts of one simulation run side by side, but their rewards are
backpropagated in the reference's order (child by child, rollout by rollout) after the wave, which gives the same
numbers because a rollout never reads the statistics it would change. With a seeded engine
(:class:`~vigorl_cli.engines.hf.HFEngine`) the batched, async and sequential drivers build identical trees.

**Deliberate differences** from the reference (``docs/mcts.md`` has the full list): repeated coordinates are
compared by value (``(10,20)`` equals ``(10, 20)``), not as strings; a rollout that never answers scores 0
(``compat``: the reference judges its last thought as if it were an answer, so a thought that mentions the right
option word can score 1); grounding answers are judged in the original image frame (the points are in the frame of
the image the teacher saw, stored as ``frame``); ``mode: multiturn`` is new (below).

**mode: multiturn** (not in the reference): the tree is searched over a real multi-turn conversation, run by
:class:`vigorl_cli.agent.episode.Episode` (multi-turn system prompt, ``<tool_call>`` steps, the crop fed back as an
observation turn, forced answer at the image limit). At the step and depth limits the forced answer is the
episode's forced-answer prefix (``FORCED_ANSWER_PREFIX``) starting the assistant turn, where single-turn mode adds
the ``FORCE_FINAL_TEXT`` user message. A node is one assistant turn (``thought_text`` = the whole turn, the forced
prefix included) and holds its conversation; children continue it; a node whose turn called the zoom tool records the crop
(``crop``). Rollouts record which turns called the tool, so :mod:`vigorl_cli.linearize.multiturn` turns the tree
straight into dialogs without post-hoc crop insertion.
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from vigorl_cli.agent.episode import Episode, EpisodeConfig
from vigorl_cli.agent.parse import extract_answer, find_points, parse_response
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, GenerationRequest, SamplingParams, derive_seed
from vigorl_cli.models import prompts
from vigorl_cli.rewards.judges import JudgeResult, judge_in_frame
from vigorl_cli.search.tree import Rollout, TreeNode, TreeRecord
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class MCTSSettings:
    """Everything one search needs; built from a recipe by :meth:`from_recipe` (one home per value: the recipe)."""

    simulations: int = 8
    max_depth: int = 10
    children_per_expand: int = 3
    rollouts_per_node: int = 2
    rollout_max_steps: int = 5
    c_puct: float = 2.0
    thought_range: tuple[int, int] | None = prompts.THOUGHT_COUNT_RANGE  # None: no "at least N thoughts" line
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    preset: str = "spatial"
    system_prompt: str | None = None  # explicit text (overrides the preset)
    literal_newlines: bool = False
    judge: str | None = None  # None: the sample's task default
    compat: bool = False  # reference judges and the reference's no-answer rollout scoring
    mode: str = "singleturn"  # singleturn | multiturn
    zoom: ZoomTool | None = None  # multiturn
    max_images: int = 5  # multiturn: the question image + crops
    observation_style: str = "rl"  # multiturn: the observation turn text (agent.episode.EpisodeConfig)
    seed: int = 42
    timeout_s: float | None = None

    @classmethod
    def from_recipe(cls, r: Any) -> MCTSSettings:
        m = r.mcts
        sampling = SamplingParams.from_config(m.sampling, n=1, stop=tuple(m.stop))
        zoom = r.tool.zoom()
        return cls(simulations=m.simulations, max_depth=m.max_depth, children_per_expand=m.children_per_expand,
                   rollouts_per_node=m.rollouts_per_node, rollout_max_steps=m.rollout_max_steps, c_puct=m.c_puct,
                   thought_range=(m.min_thoughts, m.max_thoughts) if m.add_thought_number else None,
                   sampling=sampling, preset=r.prompt.preset, system_prompt=r.prompt.system,
                   literal_newlines=r.prompt.literal_newlines, judge=None if m.judge == "auto" else m.judge,
                   compat=m.compat, mode=m.mode, zoom=zoom, max_images=r.tool.value("max_images"),
                   observation_style=r.tool.style(), seed=r.seed,
                   timeout_s=m.sample_timeout_s or None)


# ---------------------------------------------------------------------------------------------------------------
# Generations and waves
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Gen:
    """One generation a search needs. ``key`` names the group of samples it belongs to (one expansion, or the first
    step of a child's rollouts); ``k`` is its index in the group. Its seed is ``derive_seed(base_seed, k)``."""

    key: tuple
    k: int
    base_seed: int
    request: GenerationRequest  # n = 1, seeded for this k


def merge_requests(gens: list[Gen], group_n: bool = True) -> tuple[list[GenerationRequest], list[int]]:
    """Requests to send for ``gens`` and how many gens each covers. With ``group_n``, a run of gens with one key and
    ``k = 0, 1, ...`` becomes one request with ``n`` samples and the group's base seed (engines seed sample k of it
    with ``derive_seed(base, k)``: the same as the single requests)."""
    reqs, sizes, i = [], [], 0
    while i < len(gens):
        j = i + 1
        if group_n and gens[i].k == 0:
            while j < len(gens) and gens[j].key == gens[i].key and gens[j].k == j - i:
                j += 1
        if j - i == 1:
            reqs.append(gens[i].request)
        else:
            r = gens[i].request
            reqs.append(replace(r, params=r.params.with_(n=j - i, seed=gens[i].base_seed),
                                request_id=r.request_id.rsplit("/", 1)[0]))
        sizes.append(j - i)
        i = j
    return reqs, sizes


def split_results(results: list[list[Completion]], sizes: list[int]) -> list[Completion]:
    """Flatten per-request completions back to one per gen (a short answer is padded with error completions)."""
    out: list[Completion] = []
    for comps, n in zip(results, sizes):
        comps = list(comps)[:n]
        comps += [Completion([], "", None, "error", error="engine returned too few completions")] * (n - len(comps))
        out.extend(comps)
    return out


Wave = list[Gen]
Search = Generator[Wave, list[Completion], Any]


def gather(subs: list[Search]) -> Search:
    """Run sub-searches side by side: each wave is the concatenation of their pending waves. Returns their results."""
    results: list[Any] = [None] * len(subs)
    waves: dict[int, Wave] = {}
    for i, g in enumerate(subs):
        try:
            waves[i] = next(g)
        except StopIteration as e:
            results[i] = e.value
    while waves:
        order = list(waves.items())
        comps = yield [gen for _, w in order for gen in w]
        waves, pos = {}, 0
        for i, w in order:
            part, pos = comps[pos:pos + len(w)], pos + len(w)
            try:
                waves[i] = subs[i].send(part)
            except StopIteration as e:
                results[i] = e.value
    return results


# ---------------------------------------------------------------------------------------------------------------
# Judging (frames glue around the shared judges)
# ---------------------------------------------------------------------------------------------------------------

def judge_answer(pred: str | None, sample: Sample, frame: Frame, judge: str | None = None,
                 compat: bool = False) -> JudgeResult:
    """Score an answer given in ``frame``'s pixels (the image the teacher saw) against the sample (original frame):
    the shared :func:`vigorl_cli.rewards.judges.judge_in_frame` (identical to the reference when the teacher saw the
    original image, as the reference's server did)."""
    return judge_in_frame(pred, sample, frame, judge=judge, compat=compat)[0]


# ---------------------------------------------------------------------------------------------------------------
# One step of a conversation (the two modes)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """What one generated step did. ``text``: as stored in ``ephemeral_texts``; ``node_text``: as stored in the
    node (singleturn terminal nodes hold the bare answer, reference §1.5); ``points``: coordinates it named."""

    text: str
    node_text: str
    terminal: bool
    answer: str | None
    state: Any
    points: list[tuple[float, float]]
    point_texts: list[str]
    n_tokens: int = 0
    crop: dict | None = None
    finish: str | None = None


class EngineFailure(RuntimeError):
    """A generation came back with ``finish_reason == "error"``: the sample is recorded as ``engine_error``."""


class SearchTimeout(RuntimeError):
    pass


def clean_text(text: str) -> str:
    """The completion text as a chat API returns it: end-of-turn tokens removed."""
    for t in _END_TOKENS:
        text = text.replace(t, "")
    return text


def fork_episode(ep: Episode) -> Episode:
    """An independent copy of a conversation (its lists are only ever appended to, so shallow copies suffice)."""
    new = copy.copy(ep)
    for name in ("images", "crops", "segments", "turn_texts", "failures", "messages"):
        setattr(new, name, list(getattr(ep, name)))
    return new


# ---------------------------------------------------------------------------------------------------------------
# The search of one sample
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Counters:
    """Run-wide live counters (shared by all searches of a run) for progress display."""

    steps: int = 0  # generations consumed (tree nodes + rollout steps)
    tokens: int = 0  # generated tokens


class TreeSearch:
    """The MCTS of one sample. Drive it with :meth:`start` / :meth:`advance` (or a ``drive_*`` function)."""

    def __init__(self, sample: Sample, image: Image.Image, frame: Frame, processor: Any, settings: MCTSSettings,
                 image_path: str = "", counters: Counters | None = None):
        self.sample = sample
        self.image = image  # what the teacher sees (frame.size)
        self.frame = frame
        self.processor = processor
        self.tok = processor.tokenizer
        self.cfg = settings
        self.image_path = image_path
        self.counters = counters or Counters()
        self.n_thoughts: int | None = None
        if settings.thought_range is not None and settings.mode == "singleturn":
            lo, hi = settings.thought_range
            self.n_thoughts = lo + derive_seed(settings.seed, sample.id, "n_thoughts") % (hi - lo + 1)
        self.system_prompt = self._system_prompt()
        self.root = TreeNode(sample.question)
        self.root.used_coords = [p.text for p in find_points(sample.question)]
        self.root.state = self._root_state()
        self.stats = {"steps": 0, "tokens": 0, "prompt_tokens": 0, "skipped_repeats": 0,
                      "expansions": 0, "rollouts": 0}
        self.error: tuple[str, str] | None = None
        self.done = False
        self.t0 = 0.0
        self.elapsed = 0.0
        self._gen: Search | None = None

    # -- prompts ------------------------------------------------------------------------------------------------
    def _system_prompt(self) -> str:
        c = self.cfg
        if c.system_prompt is not None:
            base = c.system_prompt
        elif c.mode == "multiturn":
            base = prompts.system_prompt(c.preset, "multiturn", literal_newlines=c.literal_newlines)
        else:
            return prompts.mcts_system_prompt(c.preset, self.n_thoughts, literal_newlines=c.literal_newlines)
        return base + prompts.thought_count_line(self.n_thoughts) if self.n_thoughts is not None else base

    def _root_state(self) -> Any:
        if self.cfg.mode == "singleturn":
            return ()  # the thoughts after the question
        # max_turns = max_depth + 1: a node at max_depth stays expandable, and its expansion is forced to answer
        # (as in single-turn mode), so the episode's own turn limit never ends a conversation unanswered first
        cfg = EpisodeConfig(sampling=self.cfg.sampling, multiturn=True, zoom=self.cfg.zoom,
                            max_turns=self.cfg.max_depth + 1, max_images=self.cfg.max_images,
                            max_response_tokens=1 << 30, observation_style=self.cfg.observation_style)
        return Episode(self.sample, self.image, self.frame, self.system_prompt, self.processor, cfg,
                       seed=self.cfg.seed)

    def _prepare(self, state: Any, force: bool) -> tuple[Any, GenerationRequest]:
        """The state the next step continues and its request (n = 1, not yet seeded). ``force``: the step must
        answer. Single-turn: a second user message ``FORCE_FINAL_TEXT`` (reference). Multi-turn: a copy of the
        conversation whose next assistant turn starts with the episode's forced-answer prefix
        (:meth:`Episode.force_answer`, the same text the episode appends at its image limit); the completion is
        fed to that copy, so the node's turn holds the prefix. ``state`` itself is never modified."""
        if self.cfg.mode == "multiturn":
            if force and not state.done:
                state = fork_episode(state)
                state.force_answer()
            return state, state.request()  # the episode builds its own token-exact prompt
        return state, self._request(state, force)

    def _request(self, state: Any, force: bool) -> GenerationRequest:
        """Single-turn: the reference's prompt layout for the thoughts in ``state``."""
        text = prompts.mcts_user_text(self.sample.question, list(state))
        messages: list[dict] = [{"role": "system", "content": self.system_prompt},
                                {"role": "user", "content": [{"type": "image", "image": self.image},
                                                             {"type": "text", "text": text}]}]
        template = [messages[0], {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if force:
            messages.append({"role": "user", "content": prompts.FORCE_FINAL_TEXT})
            template.append(messages[-1])
        prompt = self.processor.apply_chat_template(template, tokenize=False, add_generation_prompt=True)
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        return GenerationRequest(prompt_ids=ids, images=[self.image], params=self.cfg.sampling, messages=messages,
                                 image_keys=[f"{self.sample.id}/full"])

    def _gen_for(self, key: tuple, k: int, request: GenerationRequest) -> Gen:
        base = derive_seed(self.cfg.seed, self.sample.id, *key)
        seed = derive_seed(base, k)
        rid = f"{self.sample.id}/{'/'.join(str(p) for p in key)}/{k}"
        self.stats["prompt_tokens"] += len(request.prompt_ids)
        return Gen(key, k, base, replace(request, params=request.params.with_(n=1, seed=seed), request_id=rid))

    def _advance_state(self, state: Any, comp: Completion) -> Step:
        """Apply one completion to a conversation state (never modifies ``state``)."""
        if comp.finish_reason == "error":
            raise EngineFailure(comp.error or "engine error")
        n_tok = comp.n_tokens or len(self.tok(comp.text, add_special_tokens=False)["input_ids"])
        self.stats["steps"] += 1
        self.stats["tokens"] += n_tok
        self.counters.steps += 1
        self.counters.tokens += n_tok
        if self.cfg.mode == "singleturn":
            text = clean_text(comp.text)
            pts = find_points(text)
            terminal = "<answer>" in text
            answer = extract_answer(text) if terminal else None
            return Step(text, answer if terminal else text, terminal, answer, state + (text,),
                        [p.xy for p in pts], [p.text for p in pts], n_tok)
        ep = fork_episode(state)
        ep.feed(comp)
        text = clean_text(ep.turn_texts[-1])
        parsed = parse_response(text)
        points, texts = [p.xy for p in parsed.points], [p.text for p in parsed.points]
        crop = None
        if len(ep.crops) > len(state.crops):
            crop = ep.crops[-1]
            x, y = crop["point"]
            points.append((x, y))
            texts.append(f"({x}, {y})")
        return Step(text, text, ep.done, ep.answer, ep, points, texts, n_tok, crop=crop, finish=ep.finish)

    def _score(self, answer: str | None) -> tuple[float, str | None]:
        if answer is None:
            return 0.0, "no_answer"
        res = judge_answer(answer, self.sample, self.frame, self.cfg.judge, self.cfg.compat)
        return float(res.score), (str(res.failure) if res.failure else None)

    # -- the algorithm ------------------------------------------------------------------------------------------
    def _select(self) -> list[TreeNode]:
        node, path = self.root, [self.root]
        while not node.is_terminal and node.children and all(c.visit_count > 0 for c in node.children):
            parent_n = node.visit_count
            node = max(node.children, key=lambda c: c.value + self.cfg.c_puct * math.sqrt(
                math.log(parent_n + 1) / (c.visit_count + 1)))
            path.append(node)
        return path

    def _search(self) -> Search:
        for _ in range(self.cfg.simulations):
            path = self._select()
            leaf = path[-1]
            if leaf.is_terminal:
                if leaf.visit_count == 0:
                    leaf.value, _ = self._score(self._answer_of(leaf))
                    leaf.visit_count = 1
                for n in path:
                    n.update(leaf.value)
                continue
            children = yield from self._expand(leaf)
            jobs = [(c, r) for c in children for r in range(self.cfg.rollouts_per_node)]
            rollouts = yield from gather([self._rollout(c, r) for c, r in jobs])
            for (child, _), ro in zip(jobs, rollouts):  # the reference's order: child by child, rollout by rollout
                child.rollouts.append(ro)
                for n in path + [child]:
                    n.update(ro.reward)

    def _expand(self, leaf: TreeNode) -> Search:
        force = leaf.depth >= self.cfg.max_depth
        key = ("expand", leaf.path_id, leaf.expansions)
        leaf.expansions += 1
        self.stats["expansions"] += 1
        state, request = self._prepare(leaf.state, force)
        comps = yield [self._gen_for(key, k, request) for k in range(self.cfg.children_per_expand)]
        used = {p.xy for s in leaf.used_coords for p in find_points(s)}
        children = []
        for comp in comps:
            step = self._advance_state(state, comp)
            if not step.terminal and any(p in used for p in step.points):
                self.stats["skipped_repeats"] += 1  # "Never repeat coordinates": the child is dropped
                continue
            extra: dict[str, Any] = {"n_tokens": step.n_tokens}
            if step.crop is not None:
                extra["crop"] = {"point": step.crop["point"], "window": step.crop["window"]}
            if self.cfg.mode == "multiturn" and step.terminal:
                extra["finish"] = step.finish
            new_coords = [t for t in dict.fromkeys(step.point_texts) if t not in leaf.used_coords]
            child = TreeNode(step.node_text, is_terminal=step.terminal, used_coords=leaf.used_coords + new_coords,
                             extra=extra, state=step.state)
            children.append(leaf.add_child(child))
        return children

    def _answer_of(self, node: TreeNode) -> str | None:
        return node.state.answer if self.cfg.mode == "multiturn" else node.thought_text

    def _rollout(self, child: TreeNode, r: int) -> Search:
        path = child.path()
        texts = [n.thought_text for n in path]
        crops = [{"turn": i, "point": n.extra["crop"]["point"]} for i, n in enumerate(path) if "crop" in n.extra]
        self.stats["rollouts"] += 1
        if child.is_terminal:
            reward, failure = self._score(self._answer_of(child))
            return self._rollout_record(child.thought_text, reward, failure, texts, child.depth, 0, 0, 0, 0, crops)
        seen = {p.xy for s in child.used_coords for p in find_points(s)}
        state, depth, edepth = child.state, 0, child.depth
        same = different = n_tok = 0
        answer, answered = None, False
        while depth < self.cfg.rollout_max_steps and edepth < self.cfg.max_depth:
            force = depth == self.cfg.rollout_max_steps - 1 or edepth == self.cfg.max_depth - 1
            # the first steps of a child's rollouts share one prompt: one group (n = rollouts_per_node)
            key, k = (("rollout", child.path_id, 0), r) if depth == 0 else (("rollout", child.path_id, r, depth), 0)
            state, request = self._prepare(state, force)
            comp = (yield [self._gen_for(key, k, request)])[0]
            step = self._advance_state(state, comp)
            state, depth, edepth, n_tok = step.state, depth + 1, edepth + 1, n_tok + step.n_tokens
            texts.append(step.text)
            if step.crop is not None:
                crops.append({"turn": len(texts) - 1, "point": step.crop["point"]})
            for p in step.points:
                same, different = (same + 1, different) if p in seen else (same, different + 1)
                seen.add(p)
            if step.terminal:
                answer, answered = step.answer, True
                break
        if answered:
            reward, failure = self._score(answer)
            final = answer
        elif self.cfg.compat:  # reference: the last text is judged as if it were the answer
            final = texts[-1]
            reward, failure = self._score(final)
        else:
            final, reward, failure = texts[-1], 0.0, "no_answer"
        return self._rollout_record(final, reward, failure, texts, edepth, depth, same, different, n_tok, crops)

    def _rollout_record(self, final, reward, failure, texts, edepth, depth, same, different, n_tok, crops) -> Rollout:
        extra: dict[str, Any] = {"n_tokens": n_tok}
        if failure:
            extra["failure"] = failure
        if self.cfg.mode == "multiturn":
            extra["crops"] = crops
        return Rollout(final, reward, texts, edepth, depth, same, different, extra)

    # -- driving ------------------------------------------------------------------------------------------------
    def start(self) -> Wave:
        """Begin the search; returns the first wave ([] when it finished without generating)."""
        self.t0 = time.monotonic()
        self._gen = self._search()
        return self._next(None)

    def advance(self, comps: list[Completion]) -> Wave:
        """Feed the completions of the last wave (in order); returns the next wave, [] when finished or failed."""
        return self._next(comps)

    def _next(self, comps: list[Completion] | None) -> Wave:
        try:
            if comps is not None and (left := self.time_left()) is not None and left < 0:
                raise SearchTimeout(f"search exceeded {self.cfg.timeout_s:g} s")
            return next(self._gen) if comps is None else self._gen.send(comps)
        except StopIteration:
            self._finish()
        except SearchTimeout as e:
            self._finish(("timeout", str(e)))
        except EngineFailure as e:
            self._finish(("engine_error", str(e)))
        except Exception as e:  # a failed sample is data: recorded with its kind, the run goes on
            if os.environ.get("VIGORL_DEBUG") == "1":
                raise
            self._finish(("exception", f"{type(e).__name__}: {e}"))
        return []

    def time_left(self) -> float | None:
        """Seconds left before ``timeout_s`` (negative when past it); ``None`` without a timeout."""
        if not self.cfg.timeout_s:
            return None
        return self.cfg.timeout_s - (time.monotonic() - self.t0)

    def abandon_timeout(self) -> None:
        """Give up a search whose pending wave ran past ``timeout_s`` (the driver cancelled its requests): it ends
        as a ``timeout`` error, which a rerun retries."""
        if not self.done:
            self._finish(("timeout", f"search exceeded {self.cfg.timeout_s:g} s (its requests were cancelled)"))

    def _finish(self, error: tuple[str, str] | None = None) -> None:
        self.done, self.error = True, error
        self.elapsed = time.monotonic() - self.t0
        if self._gen is not None:
            self._gen.close()

    # -- output -------------------------------------------------------------------------------------------------
    def tree_record(self) -> TreeRecord:
        c = self.cfg
        extra: dict[str, Any] = {
            "frame": self.frame.to_dict(), "mode": c.mode, "preset": c.preset, "judge": c.judge or "auto",
            "n_thoughts": self.n_thoughts, "seed": c.seed,
            "timings": {"search_s": round(self.elapsed, 3)},
            "tokens": {"generated": self.stats["tokens"], "prompt": self.stats["prompt_tokens"]},
            "stats": {k: self.stats[k] for k in ("steps", "expansions", "rollouts", "skipped_repeats")},
        }
        if c.mode == "multiturn" and c.zoom is not None:
            extra["tool"] = {"offset": c.zoom.offset, "crop_size": c.zoom.crop_size, "draw_dot": c.zoom.draw_dot,
                             "max_images": c.max_images}
        rec = TreeRecord(self.sample.question, self.image_path, self.sample.answer, self.system_prompt,
                         round(self.elapsed, 3), self.sample.id, self.root, extra)
        rec.extra["stats"]["nodes"] = rec.n_nodes()
        rec.extra["root_correct"] = rec.root_correct
        return rec

    def error_record(self) -> dict:
        kind, message = self.error or ("exception", "")
        d = {"id": self.sample.id, "error": kind, "error_message": message,
             "global_search_time": round(self.elapsed, 3)}
        if kind == "timeout":
            d["timeout_seconds"] = self.cfg.timeout_s
        return d


# ---------------------------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------------------------

def drive_sequential(engine: Any, searches: Iterable[TreeSearch], on_finish: Callable[[TreeSearch], None]) -> None:
    """The reference's request pattern: one tree at a time, one ``n = 1`` request at a time."""
    for s in searches:
        wave = s.start()
        while wave:
            wave = s.advance([split_results(engine.generate([g.request]), [1])[0] for g in wave])
        on_finish(s)


def drive_batched(engine: Any, searches: Iterable[TreeSearch], on_finish: Callable[[TreeSearch], None],
                  in_flight: int = 16, group_n: bool = True, on_wave: Callable[[], None] | None = None) -> None:
    """Keep ``in_flight`` searches open; each round sends the pending waves of all of them in one ``generate``."""
    pending = iter(searches)
    live: list[tuple[TreeSearch, Wave]] = []

    def refill() -> None:
        while len(live) < in_flight:
            s = next(pending, None)
            if s is None:
                return
            wave = s.start()
            if wave:
                live.append((s, wave))
            else:
                on_finish(s)

    refill()
    while live:
        gens = [g for _, w in live for g in w]
        reqs, sizes = merge_requests(gens, group_n)
        comps = split_results(engine.generate(reqs), sizes)
        nxt, pos = [], 0
        for s, w in live:
            wave = s.advance(comps[pos:pos + len(w)])
            pos += len(w)
            if wave:
                nxt.append((s, wave))
            else:
                on_finish(s)
        live[:] = nxt
        if on_wave is not None:
            on_wave()
        refill()


def drive_async(engine: Any, searches: Iterable[TreeSearch], on_finish: Callable[[TreeSearch], None],
                in_flight: int = 16, group_n: bool = True, on_wave: Callable[[], None] | None = None) -> None:
    """Async engines: ``in_flight`` searches run as tasks; a wave's requests go out concurrently; no barrier.

    A search with a timeout waits for its wave at most the time it has left: when that runs out, its pending
    requests are cancelled and it ends as a ``timeout`` error (so one slow request cannot hold a tree far past
    ``timeout_s``, nor its worker slot)."""
    it = iter(searches)

    async def worker() -> None:
        for s in it:  # the shared iterator hands each search to exactly one worker
            wave = s.start()
            while wave:
                reqs, sizes = merge_requests(wave, group_n)
                calls = asyncio.gather(*(engine.agenerate(r) for r in reqs))
                left = s.time_left()
                try:
                    results = await (calls if left is None else asyncio.wait_for(calls, max(0.0, left)))
                except asyncio.TimeoutError:
                    s.abandon_timeout()
                    break
                wave = s.advance(split_results(list(results), sizes))
                if on_wave is not None:
                    on_wave()
            on_finish(s)

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(max(1, in_flight))))

    asyncio.run(main())


def drive(engine: Any, searches: Iterable[TreeSearch], on_finish: Callable[[TreeSearch], None], in_flight: int = 16,
          group_n: bool = True, on_wave: Callable[[], None] | None = None) -> None:
    """The best driver for ``engine``: async for engines with ``agenerate``, else batched."""
    fn = drive_async if hasattr(engine, "agenerate") else drive_batched
    fn(engine, searches, on_finish, in_flight=in_flight, group_n=group_n, on_wave=on_wave)
