"""Tasks: labelled texts, class-disjoint splits, and episodes drawn from them."""

from metarun.task.data import TaskData, check_feasible, load_task
from metarun.task.episodes import STREAM, Episode, EpisodeSampler, Examples, fixed_episodes

__all__ = [
    "STREAM",
    "Episode",
    "EpisodeSampler",
    "Examples",
    "TaskData",
    "check_feasible",
    "fixed_episodes",
    "load_task",
]
