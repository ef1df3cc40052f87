"""Generated tables inside hand-written markdown: only the marked block is rewritten."""

from __future__ import annotations

import re
from pathlib import Path


def replace_block(path: Path, name: str, body: str) -> None:
    """Rewrite what lies between `<!-- name:begin -->` and `<!-- name:end -->` in `path`,
    appending the block (and creating the file) when it is not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
