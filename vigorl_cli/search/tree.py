"""The MCTS tree and its JSON form: the reference schema (digest §1.7) plus our extra fields.

One search writes one JSON line per sample::

    {"question": "<image>\\n...", "image": "/abs/path.png", "true_answer": "...", "system_prompt": "...",
     "global_search_time": 12.3, "id": "...",
     "tree": {"thought_text": "<question>", "is_terminal": false, "value": 0.42, "visit_count": 38,
              "used_coords": [], "rollouts": [], "children": [...]},
     ...our extra top-level fields (below)}

Node and rollout keys are exactly the reference's, in the reference's order, so the reference linearizer (and any
tool written for it) reads our trees. Our additions never replace a reference key; they are extra keys that
readers of the reference schema ignore:

==================  ==========================================================================================
where               extra keys
==================  ==========================================================================================
tree record         ``frame`` (the coordinate frame of every point in the tree: the image the teacher saw, as
                    :meth:`vigorl_cli.vision.frames.Frame.to_dict`), ``mode`` (singleturn | multiturn),
                    ``preset``, ``judge``, ``n_thoughts``, ``seed``, ``root_correct`` (any rollout scored 1),
                    ``timings`` (seconds), ``tokens`` (generated / prompt tokens, requests), ``stats``
                    (nodes, skipped children, ...), ``tool`` (zoom settings, multiturn mode)
node                ``n_tokens`` (tokens generated for this thought), ``crop`` (multiturn: the zoom the step
                    asked for, point and window in ``frame``), ``finish`` (multiturn terminal nodes: why the
                    conversation ended)
rollout             ``n_tokens``, ``failure`` (why the reward is 0 without a wrong answer, e.g. ``no_answer``),
                    ``crops`` (multiturn: ``{"turn": k, "point": [x, y]}`` for each turn k of
                    ``ephemeral_texts`` that called the zoom tool)
==================  ==========================================================================================

Reading keeps unknown keys (``extra``), so ``to_dict(from_dict(d)) == d`` for reference trees and ours alike.
``used_coords`` is a set in the reference (serialised in arbitrary order); here it is a list in the order the
coordinates first appeared on the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

NODE_KEYS = ("thought_text", "is_terminal", "value", "visit_count", "used_coords", "rollouts", "children")
ROLLOUT_KEYS = ("final_answer", "reward", "ephemeral_texts", "ephemeral_depth", "depth", "num_same_points",
                "num_different_points")
RECORD_KEYS = ("question", "image", "true_answer", "system_prompt", "global_search_time", "id")


@dataclass
class Rollout:
    """One simulation from a new child to an answer, stored on the child (reference ``_rollout`` record).

    ``ephemeral_texts``: every text from the root (index 0: the question, with ``<image>``) through the child and
    the generated continuation; the last one holds the answer. ``reward``: the 0/1 judge score.
    """

    final_answer: str | None
    reward: float
    ephemeral_texts: list[str]
    ephemeral_depth: int
    depth: int
    num_same_points: int = 0
    num_different_points: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ROLLOUT_KEYS}
        d["ephemeral_texts"] = list(self.ephemeral_texts)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Rollout:
        return cls(final_answer=d.get("final_answer"), reward=float(d.get("reward", 0.0)),
                   ephemeral_texts=list(d.get("ephemeral_texts") or []),
                   ephemeral_depth=int(d.get("ephemeral_depth", 0)), depth=int(d.get("depth", 0)),
                   num_same_points=int(d.get("num_same_points", 0)),
                   num_different_points=int(d.get("num_different_points", 0)),
                   extra={k: v for k, v in d.items() if k not in ROLLOUT_KEYS})


@dataclass(eq=False)
class TreeNode:
    """One thought step (reference ``TreeNode``). ``value`` is the running mean of the 0/1 returns through it.

    In memory only (never serialised): ``parent``, ``expansions`` (how often this node was expanded, part of the
    sampling seeds) and ``state`` (multiturn mode: the conversation up to and including this step).
    """

    thought_text: str
    is_terminal: bool = False
    value: float = 0.0
    visit_count: int = 0
    used_coords: list[str] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    children: list[TreeNode] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    parent: TreeNode | None = field(default=None, repr=False)
    expansions: int = 0
    state: Any = field(default=None, repr=False)

    # -- structure ------------------------------------------------------------------------------------------------
    def add_child(self, child: TreeNode) -> TreeNode:
        child.parent = self
        self.children.append(child)
        return child

    @property
    def depth(self) -> int:
        """Number of ancestors (the root has depth 0)."""
        d, n = 0, self.parent
        while n is not None:
            d, n = d + 1, n.parent
        return d

    @property
    def path_id(self) -> str:
        """Child indices from the root, dot-joined (root: ``""``); stable, so it can seed generations."""
        parts, n = [], self
        while n.parent is not None:
            parts.append(str(n.parent.children.index(n)))
            n = n.parent
        return ".".join(reversed(parts))

    def path(self) -> list[TreeNode]:
        """Root → this node."""
        out, n = [], self
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def iter_nodes(self) -> Iterator[TreeNode]:
        """Pre-order (the reference linearizer's order)."""
        yield self
        for c in self.children:
            yield from c.iter_nodes()

    # -- statistics -----------------------------------------------------------------------------------------------
    def update(self, reward: float) -> None:
        """Reference ``update_value_mcts``: ``visit_count += 1; value += (r - value) / visit_count``."""
        self.visit_count += 1
        self.value += (reward - self.value) / self.visit_count

    # -- JSON -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"thought_text": self.thought_text, "is_terminal": self.is_terminal, "value": self.value,
             "visit_count": self.visit_count, "used_coords": list(self.used_coords),
             "rollouts": [r.to_dict() for r in self.rollouts], "children": [c.to_dict() for c in self.children]}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict, parent: TreeNode | None = None) -> TreeNode:
        node = cls(thought_text=d.get("thought_text", ""), is_terminal=bool(d.get("is_terminal", False)),
                   value=float(d.get("value", 0.0)), visit_count=int(d.get("visit_count", 0)),
                   used_coords=list(d.get("used_coords") or []),
                   rollouts=[Rollout.from_dict(r) for r in d.get("rollouts") or []],
                   extra={k: v for k, v in d.items() if k not in NODE_KEYS}, parent=parent)
        node.children = [cls.from_dict(c, node) for c in d.get("children") or []]
        return node


@dataclass
class TreeRecord:
    """One sample's search result: the reference record keys, the tree, and our extra top-level fields."""

    question: str
    image: str
    true_answer: str
    system_prompt: str
    global_search_time: float
    id: str
    tree: TreeNode
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in RECORD_KEYS}
        d["tree"] = self.tree.to_dict()
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TreeRecord:
        """Raises ``ValueError`` for an error record (``"error"`` key) or a record without a tree."""
        if "error" in d:
            raise ValueError(f"sample {d.get('id')!r} is an error record ({d['error']}), not a tree")
        if not isinstance(d.get("tree"), dict):
            raise ValueError("not a tree record: no 'tree' object")
        return cls(question=d.get("question", ""), image=d.get("image", ""), true_answer=str(d.get("true_answer", "")),
                   system_prompt=d.get("system_prompt", ""), global_search_time=float(d.get("global_search_time", 0.0)),
                   id=str(d.get("id", "")), tree=TreeNode.from_dict(d["tree"]),
                   extra={k: v for k, v in d.items() if k not in RECORD_KEYS and k != "tree"})

    # -- summaries ------------------------------------------------------------------------------------------------
    def all_rollouts(self) -> list[Rollout]:
        return [r for n in self.tree.iter_nodes() for r in n.rollouts]

    @property
    def root_correct(self) -> bool:
        """Any rollout in the tree scored 1 (the "root accuracy" of the search)."""
        return any(r.reward >= 1.0 for r in self.all_rollouts())

    def n_nodes(self) -> int:
        """Tree nodes without the root."""
        return sum(1 for _ in self.tree.iter_nodes()) - 1
