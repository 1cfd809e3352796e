"""Regenerate the README method table from the catalog (``normlab list --markdown``)."""

import contextlib
import io
import re
import sys
from pathlib import Path

from normlab.cli import main

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def method_table() -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["list", "--markdown"])
    return buf.getvalue()


def updated(readme: str) -> str:
    return re.sub(f"{START}.*?{END}", f"{START}\n{method_table()}{END}", readme, flags=re.S)


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "README.md"
    text = path.read_text()
    new = updated(text)
    path.write_text(new)
    sys.exit(0)
