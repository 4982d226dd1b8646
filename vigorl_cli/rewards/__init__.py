"""Scoring, defined once and shared by MCTS, GRPO and eval.

* :mod:`.judges`: is an answer right? (string match, exact match, multiple choice, point in box, point match,
  web action), each ``judge(pred, gt, *, compat=False) -> JudgeResult``.
* :mod:`.presets`: GRPO rewards built from the judges and the format checks of :mod:`vigorl_cli.agent.parse`,
  returning named parts ``{"overall", "accuracy", "format", "grounding", "diversity"}``.
"""

from vigorl_cli.rewards.judges import JUDGES, JudgeResult, get_judge, judge_for_task, judge_sample
from vigorl_cli.rewards.presets import PRESETS, RewardInput, build_reward, get_reward, load_reward

__all__ = ["JUDGES", "JudgeResult", "PRESETS", "RewardInput", "build_reward", "get_judge", "get_reward",
           "judge_for_task", "judge_sample", "load_reward"]
