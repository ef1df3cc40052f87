"""Test-time adaptation of fixed validation episodes under two versions of the code.

A speed change to the inner loop or to prompt scoring is checked against the code before it:
`--code` names the checkout whose metarun (and benchmarks/measure.py) runs, a `git worktree` of
the older commit, say; compare the JSON files of the same episodes (seconds per episode,
per-episode accuracies and the query scores themselves). Each call is one fresh process and
one cell:

    today:  the path issue 25 started from: LoRA in every block, 10 SGD steps at 0.1, fp32
    recipe: LoRA in the last 8 blocks, 10 Adam steps at 0.003, bf16 (meta_lora_llm's inner loop)

    git worktree add --detach /tmp/old <commit>
    python scripts/adapt_ab.py --code /tmp/old --task banking77 --cell today --out old-today.json
    python scripts/adapt_ab.py --task banking77 --cell recipe --out new-recipe.json

`--toggle-eager` instead runs the recipe in one process with the replayed blocks' eager
attention (backbone/bottom.py, `EAGER_WIDTH`) on and off, alternating per episode, so that both
arms see the same load on a shared machine. Only validation classes are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

CELLS = {
    "today": ["algo=maml", "algo.head=verbalizer", "hardware.precision=fp32"],
    "recipe": ["algo=fomaml", "algo.head=verbalizer", "algo.adapt=lora", "algo.adapt_layers=8",
               "algo.inner_optimizer=adam", "algo.inner_lr=0.003", "backbone.trainable=none",
               "hardware.precision=bf16"],
}  # fmt: skip


def adapt(algo, episode) -> torch.Tensor:
    return algo.adapt(episode.support, episode.way)(episode.query).float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="banking77", help="a dataset under --data")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--split", default="01")
    parser.add_argument("--cell", choices=sorted(CELLS), default="recipe")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--toggle-eager", action="store_true")
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose code runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))  # before anything imports metarun
    import metarun.backbone.bottom as bottom
    from benchmarks.measure import build_for_eval

    torch.set_num_threads(1)
    overrides = ["backbone=smollm2", f"task={args.task}", f"task.data_dir={args.data}/{args.task}",
                 f"task.split={args.split}", "task.shots=1", "hardware.threads=1",
                 *CELLS["recipe" if args.toggle_eager else args.cell]]  # fmt: skip
    hw, _, algo, episodes = build_for_eval(overrides, args.episodes, "valid")
    algo.eval()
    arms = ["eager", "sdpa"] if args.toggle_eager else [args.cell]
    width = {"eager": bottom.EAGER_WIDTH, "sdpa": 0} if args.toggle_eager else {}
    seconds = {arm: [] for arm in arms}
    scores = {arm: [] for arm in arms}
    with torch.no_grad(), hw.autocast():
        adapt(algo, episodes[0])  # warm-up, not timed
        for i, episode in enumerate(episodes):
            for arm in arms if i % 2 == 0 else arms[::-1]:
                if args.toggle_eager:
                    bottom.EAGER_WIDTH = width[arm]
                start = time.perf_counter()
                scores[arm].append(adapt(algo, episode))
                seconds[arm].append(time.perf_counter() - start)
    from bench import cpu_name  # after metarun: it puts this checkout first on the path

    result = {"cpu": cpu_name(), "torch": torch.__version__, "code": args.code,
              "metarun": str(Path(bottom.__file__).parents[2]),
              "overrides": overrides, "episodes": args.episodes, "arms": {}}  # fmt: skip
    for arm in arms:
        acc = [float((s.argmax(-1) == e.query.labels).float().mean())
               for s, e in zip(scores[arm], episodes, strict=True)]  # fmt: skip
        result["arms"][arm] = {"seconds_per_episode": sum(seconds[arm]) / len(episodes),
                               "acc": acc, "mean_acc": sum(acc) / len(acc),
                               "scores": [s.tolist() for s in scores[arm]]}  # fmt: skip
        print(f"{arm}: {sum(seconds[arm]) / len(episodes):.2f} s/episode, "
              f"accuracy {100 * sum(acc) / len(acc):.1f}")  # fmt: skip
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
