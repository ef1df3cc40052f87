"""Hydra's composition errors as the one line metarun prints: its multi-line messages folded,
its noise dropped, and a misspelt key answered with the closest real one."""

from __future__ import annotations

import re
import sys

from metarun.checks import schema_fields, unknown_key_message

_NOISE = ("Config search path", "Set the environment variable HYDRA_FULL_ERROR")
_DETAIL = ("full_key:", "reference_type=", "object_type=", "provider=")


def one_line(err: BaseException) -> str:
    """Hydra's multi-line composition errors as one line; keeps the options it lists."""
    sentences: list[str] = []
    for source in (err, err.__cause__):
        for raw in str(source or "").splitlines():
            line = raw.strip().removeprefix("In 'config': ")
            if line.startswith(_NOISE):
                break
            if raw.startswith("\t") and sentences:  # an option under "Available options in ..."
                sentences[-1] += (" " if sentences[-1].endswith(":") else ", ") + line
            elif line and not line.startswith(_DETAIL) and line not in sentences:
                sentences.append(line)
    text = " ".join(s if s.endswith((".", ":")) else s + "." for s in sentences)
    swept = "Could not override" in text and {"-m", "--multirun"} & set(sys.argv)
    text = _misspelt_key(text) or text
    if swept:
        text += (
            " In a multirun, keys of a swept group are first checked against its default "
            "option: force them with ++key=value."
        )
    return text


def _misspelt_key(text: str) -> str | None:
    """Hydra answers a misspelt key with "use +key=value", which would run with the typo
    ignored; name the closest real key instead."""
    found = re.search(r"(?:override|Could not append to config) '([\w.]+)'", text)
    schema = re.search(r"Key '\w+' not in '(\w+)'", text)
    fields = schema_fields(schema.group(1)) if schema else None
    if not (found and fields):
        return None
    return unknown_key_message(found.group(1).lstrip("+~"), fields)
