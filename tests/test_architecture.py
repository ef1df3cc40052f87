"""The code's shape stays readable (issue 22): small signatures, classes and functions that fit
on a screen or two. A new parameter past the limit wants a typed config object instead."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metarun"
MAX_PARAMS, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 8, 180, 60


def _definitions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node


def test_no_signature_wider_than_eight_and_no_class_or_function_too_long():
    wide, long = [], []
    for where, node in _definitions():
        lines = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            if lines > MAX_CLASS_LINES:
                long.append(f"{where}: class of {lines} lines")
            continue
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        count = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
        if count > MAX_PARAMS:
            wide.append(f"{where}: {count} parameters")
        if lines > MAX_FUNCTION_LINES:
            long.append(f"{where}: function of {lines} lines")
    assert not wide and not long, "\n".join(wide + long)
