"""`metarun-report FOLDER... [--out DIR]`: a table per task, way and shots, paired differences
with bootstrap intervals and Holm-corrected Wilcoxon p-values, and PNG plots.

    metarun-report outputs/multirun/2026-11-24_10-00-00
    metarun-report outputs/runs/a outputs/runs/b --pair protonet maml --out report/
    metarun-report outputs/multirun/protaugment --update docs/RESULTS.md   # the docs' block

Any run folders count: single runs, multiruns, seed sweeps (every completed run with a
summary.json and config.yaml below the folders given).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metarun.report import plots
from metarun.report.blocks import replace_block
from metarun.report.runs import collect
from metarun.report.table import LEGEND, GroupReport, build, find, markdown

BLOCK = "report:results"


def render(reports: list[GroupReport], notes: list[str]) -> str:
    parts = [markdown(r) for r in reports]
    text = "\n\n".join(parts) + "\n\n" + LEGEND
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text


def write_plots(reports: list[GroupReport], out: Path) -> list[Path]:
    paths = plots.accuracy_by_shots(reports, out)
    for report in reports:
        paths.append(plots.replicates(report, out))
        curve = plots.validation_curves(report, out)
        if curve is not None:
            paths.append(curve)
    return paths


def log_to_wandb(reports: list[GroupReport], text: str, images: list[Path]) -> str:
    """One W&B run of job type "report": the tables and plots, beside the runs it compares."""
    import wandb

    project = os.environ.get("WANDB_PROJECT", "metarun")
    groups = [r.title for r in reports]
    run = wandb.init(project=project, job_type="report", name="metarun-report",
                     config={"groups": groups})  # fmt: skip
    for report in reports:
        columns = ["method", "backbone", "accuracy", "ci95", "sd", "replicates"]
        rows = [[ln.row[0], ln.row[1], ln.mean, ln.ci, ln.spread, len(ln.runs)]
                for ln in report.lines]  # fmt: skip
        run.log({f"report/{report.title}": wandb.Table(columns=columns, data=rows)})
    run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in images})
    run.log({"report/markdown": wandb.Html(f"<pre>{text}</pre>")})
    run_id = run.id
    run.finish()
    # Stop W&B's service too: it leaves WANDB_SERVICE in the environment, and a metarun started
    # later from this process (main() called in-process) would report to this dead service.
    wandb.teardown()
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metarun-report", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )  # fmt: skip
    parser.add_argument("folders", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for report.md and the plots (default: ./report)")  # fmt: skip
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help='also compare method A with B ("maml, 60 steps" or '
                             '"maml, 60 steps @ minilm"); repeatable')  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="the tables only")
    parser.add_argument("--wandb", action="store_true", help="log tables and plots to W&B")
    parser.add_argument("--update", type=Path, metavar="FILE",
                        help="also rewrite a generated block of FILE (--block)")  # fmt: skip
    parser.add_argument("--block", default=BLOCK,
                        help=f"the block --update rewrites (default: {BLOCK}); a page can hold "
                             "several reports, each between its own markers")  # fmt: skip
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"no such folder: {', '.join(missing)}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder for report.md and the plots")
    runs, notes = collect(args.folders)
    if not runs:
        parser.error("no completed run (summary.json + config.yaml) under the folders given")
    reports = build(runs, [tuple(p) for p in args.pair])
    unmatched = [n for a_b in args.pair for n in a_b
                 if not any(find(r.lines, n) for r in reports)]  # fmt: skip
    if unmatched:
        methods = sorted({line.label for r in reports for line in r.lines})
        parser.error(f"--pair {unmatched[0]!r} names no single method of these runs; their "
                     f"methods: {'; '.join(methods)}")  # fmt: skip
    text = render(reports, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    images = [] if args.no_plots else write_plots(reports, args.out)
    (args.out / "report.md").write_text(
        "# metarun report\n\n" + text + "\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    )
    if args.update is not None:
        replace_block(args.update, args.block, text)
    if args.wandb:
        log_to_wandb(reports, text, images)
    print(text)
    print(f"\nwritten: {args.out / 'report.md'}" + (f" and {len(images)} plots" if images else ""),
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
