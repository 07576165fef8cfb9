"""Reports of a `compare` result: JSON, Markdown or self-contained HTML, by file extension."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from quantcli.errors import OutputError

FORMATS = (".json", ".md", ".html")


def render(result: dict[str, Any], fmt: str) -> str:
    """The report text; `fmt` is one of FORMATS (with or without the dot)."""
    from quantcli.report.html import render_html
    from quantcli.report.markdown import render_markdown

    ext = fmt if fmt.startswith(".") else "." + fmt
    if ext == ".json":
        return json.dumps(result, indent=2, allow_nan=False) + "\n"
    if ext == ".md":
        return render_markdown(result)
    if ext in (".html", ".htm"):
        return render_html(result)
    raise OutputError(f"unknown report format '{fmt}'", hint=f"use one of {', '.join(FORMATS)}")


def write_report(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report the extension of `path` asks for, atomically (temp file + rename)."""
    target = Path(path)
    ext = target.suffix.lower()
    if ext not in (*FORMATS, ".htm"):
        raise OutputError(
            f"cannot tell the report format of '{target}'",
            hint=f"end the file name with {', '.join(FORMATS)}",
        )
    text = render(result, ext)
    directory = target.parent
    if not directory.is_dir():
        raise OutputError(f"directory {directory} does not exist", hint="create it first")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, target)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
