"""`metarun-predict RUN --support labelled.csv --queries texts.csv`: a trained run labels new
texts. The algorithm adapts on the labelled examples (one episode, its classes those of the
support file) exactly as in a test episode, then scores every query.

    metarun-predict outputs/runs/maml_b77 --support few.csv --queries new.jsonl --out pred.csv

Files: jsonl, json, csv or parquet, read as the run's task read them (its text and label
columns unless --text-column / --label-column say otherwise). The output has every column of
the queries file (ids included, to join predictions back), the predicted label and one
probability column per class (prob_<label>). Only a completed run is used: a failed or
interrupted run's checkpoint is not the trained model (--allow-failed uses it anyway).

Predictions are inductive: each text is labelled from the support examples alone, so its label
never depends on which other texts the queries file holds (a service labelling one text at a
time gets the batch's answers). A run whose algorithm refines its classifier with an episode's
queries (the transductive recipe, algo.transductive_steps) predicts inductively too unless
--transductive is given: then the whole queries file is one episode's query set, and each
prediction depends on every other text in it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from metarun.algo import build_algorithm
from metarun.backbone import load_backbone
from metarun.config import MetarunConfig, register_configs
from metarun.errors import MetarunError
from metarun.rundir.init_from import load_trained, source_config
from metarun.task import Examples, TaskData
from metarun.task.labels import readable
from metarun.task.rows import ColumnKeys, as_text, group_rows, read_rows

log = logging.getLogger("metarun")
OUTPUTS = (".csv", ".jsonl", ".parquet")
BATCH = 256  # queries scored per forward: bounds memory for files of any length
FLAGS = ColumnKeys("--text-column <one of them>", "--label-column <one of them>", None)


def check_run(run: Path, allow_failed: bool) -> None:
    """A run predicts only if it completed: a failed or interrupted run's weights are those
    of some step, and a run without summary.json is still running or was killed."""
    if not run.is_dir():
        raise MetarunError(f"RUN {run} is not a folder; give a metarun run folder")
    summary = run / "summary.json"
    if not summary.is_file():
        status = "no summary.json: still running, or killed"
    else:
        try:
            record = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MetarunError(f"RUN {run}: summary.json is not readable ({err})") from None
        if record.get("status") == "completed":
            return
        error = f": {record['error']}" if record.get("error") else ""
        status = f"status {record.get('status', 'unknown')}{error}"
    if allow_failed:
        log.warning("RUN %s did not complete (%s); --allow-failed: predicting anyway", run, status)
        return
    raise MetarunError(f"RUN {run} did not complete ({status}); predict from a completed run, "
                       "or pass --allow-failed to use the weights it saved")  # fmt: skip


def check_out(out: Path, inputs: list[Path]) -> None:
    if out.suffix.lower() not in OUTPUTS:
        raise MetarunError(f"--out {out}: use a {', '.join(OUTPUTS)} file")
    for given in inputs:
        if out.resolve() == given.resolve():
            raise MetarunError(f"--out {out} is an input file: writing would destroy it; "
                               "choose another --out")  # fmt: skip
    if not out.parent.is_dir():
        raise MetarunError(f"--out {out}: the folder {out.parent} does not exist")


def read_support(path: Path, text_col: str, label_col: str, labels: list[str] | None):
    by_label, _ = group_rows(read_rows(path, "utf-8"), text_col, label_col, f"--support {path}",
                             keys=FLAGS)  # fmt: skip
    classes = labels or sorted(by_label)
    absent = [c for c in classes if c not in by_label]
    if absent:
        raise MetarunError(f"--support {path} has no example of class {', '.join(absent[:5])}; "
                           "give at least one labelled text per class")  # fmt: skip
    extra = sorted(set(by_label) - set(classes))
    if extra:
        raise MetarunError(f"--support {path} labels texts {', '.join(extra[:5])}, which "
                           "--labels does not list")  # fmt: skip
    if len(classes) < 2:
        raise MetarunError(f"--support {path} has {len(classes)} class; predicting needs >= 2")
    return classes, by_label


def read_queries(path: Path, text_col: str) -> tuple[list[dict], list[str]]:
    """The queries file's rows (every column is kept in the output) and their texts."""
    rows = read_rows(path, "utf-8")
    if not rows:
        raise MetarunError(f"--queries {path} holds no rows")
    texts, empty = [], []
    for number, row in rows:
        if text_col not in row:
            raise MetarunError(f"--queries {path}, line {number}: no '{text_col}' field; set "
                               "--text-column")  # fmt: skip
        text = as_text(row[text_col])
        (empty.append(number) if text is None else texts.append(text))
    if empty:
        raise MetarunError(f"--queries {path}: {len(empty)} rows have an empty text (lines "
                           f"{', '.join(map(str, empty[:5]))})")  # fmt: skip
    return [row for _, row in rows], texts


def output_rows(rows: list[dict], classes: list[str], table: np.ndarray, path: Path) -> list[dict]:
    """Each query row with its prediction and class probabilities after its own columns."""
    added = ["predicted", *(f"prob_{c}" for c in classes)]
    clash = sorted({k for row in rows for k in row} & set(added))
    if clash:
        raise MetarunError(f"--queries {path} has columns the output adds ({', '.join(clash)}); "
                           "rename them")  # fmt: skip
    return [{**row, "predicted": classes[int(p.argmax())],
             **{f"prob_{c}": round(float(p[k]), 6) for k, c in enumerate(classes)}}
            for row, p in zip(rows, table, strict=True)]  # fmt: skip


def write_predictions(path: Path, rows: list[dict]) -> None:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def predict(run: Path, support: Path, queries: Path, text_col: str | None = None,
            label_col: str | None = None, labels: list[str] | None = None,
            device: str = "cpu", transductive: bool = False) -> list[dict]:  # fmt: skip
    """The rows of the output: each query row, its predicted label and class probabilities."""
    register_configs()
    config = source_config(run, "RUN")
    merged = OmegaConf.merge(OmegaConf.structured(MetarunConfig), config)
    steps = merged.algo.get("transductive_steps") or 0
    if steps and not transductive:
        merged.algo.transductive_steps = 0  # each text on its own: see the module's docstring
        log.info("inductive predictions: the run's %d transductive steps are not used "
                 "(--transductive uses them, over the whole queries file)", steps)  # fmt: skip
    typed: MetarunConfig = OmegaConf.to_object(merged)
    text_col = text_col or typed.task.text_column
    label_col = label_col or typed.task.label_column
    classes, by_label = read_support(support, text_col, label_col, labels)
    query_rows, query_texts = read_queries(queries, text_col)
    support_texts = [t for c in classes for t in by_label[c]]
    support_labels = [i for i, c in enumerate(classes) for _ in by_label[c]]
    texts = support_texts + query_texts
    encoder = load_backbone(typed.backbone)
    encoder.set_texts(texts)
    ids = {c: np.array([i for i, lab in enumerate(support_labels) if lab == k])
           for k, c in enumerate(classes)}  # fmt: skip
    data = TaskData(
        texts, {"train": ids, "valid": {}, "test": ids}, {c: readable(c) for c in classes}
    )
    algo = build_algorithm(typed.algo, encoder, len(classes), typed.algo_modules)
    algo.prepare(data)
    if (run / "checkpoint.pt").is_file():
        load_trained(algo, run, "RUN")
    else:
        log.info("%s has no checkpoint.pt (train.steps=0): the untrained model adapts", run)
    algo = algo.to(device).eval()
    shots = Examples(torch.arange(len(support_texts)), torch.tensor(support_labels), tuple(classes))
    probs = []
    with torch.no_grad():
        predictor = algo.adapt(shots, len(classes))
        batch_size = len(query_texts) if transductive else BATCH  # transductive: one query set
        for start in range(len(support_texts), len(texts), batch_size):
            part = torch.arange(start, min(start + batch_size, len(texts)))
            batch = Examples(part, torch.zeros(len(part), dtype=torch.long), tuple(classes))
            probs.append(torch.softmax(predictor(batch).float(), -1).cpu())
    return output_rows(query_rows, classes, torch.cat(probs).numpy(), queries)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="metarun-predict", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )  # fmt: skip
    parser.add_argument("run", type=Path, help="a metarun run folder")
    parser.add_argument("--support", type=Path, required=True, help="labelled examples")
    parser.add_argument("--queries", type=Path, required=True, help="texts to label")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"),
                        help="csv, jsonl or parquet (default: predictions.csv)")  # fmt: skip
    parser.add_argument("--text-column", help="default: the run's task.text_column")
    parser.add_argument("--label-column", help="default: the run's task.label_column")
    parser.add_argument("--labels", nargs="+", help="the classes to choose among (default: all "
                        "labels of the support file); each needs an example")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    parser.add_argument("--transductive", action="store_true",
                        help="classify the queries file as one episode's query set (each "
                             "prediction then depends on the other texts); default: each text "
                             "on its own")  # fmt: skip
    parser.add_argument(
        "--allow-failed",
        action="store_true",
        help="use a run that failed or was interrupted (its last best weights)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_out(args.out, [args.support, args.queries])
        check_run(args.run, args.allow_failed)
        rows = predict(args.run, args.support, args.queries, args.text_column, args.label_column,
                       args.labels, args.device, args.transductive)  # fmt: skip
        write_predictions(args.out, rows)
    except MetarunError as err:
        print(f"metarun-predict: error: {err}", file=sys.stderr)
        sys.exit(2)
    log.info("%d predictions written to %s", len(rows), args.out)


if __name__ == "__main__":
    main()
