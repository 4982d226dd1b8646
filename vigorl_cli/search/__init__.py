"""MCTS over grounded thought steps: the tree (``tree``), the batched search (``mcts``), recipe → run (``api``)."""

from vigorl_cli.search.mcts import MCTSSettings, TreeSearch, drive, drive_async, drive_batched, drive_sequential
from vigorl_cli.search.tree import Rollout, TreeNode, TreeRecord

__all__ = ["MCTSSettings", "Rollout", "TreeNode", "TreeRecord", "TreeSearch", "drive", "drive_async", "drive_batched",
           "drive_sequential"]
