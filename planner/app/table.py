"""Rows of a command's answer as a table that fits the terminal, markdown, CSV or JSON (`--format`, `--wide`).

The column order is the priority order: when a table is wider than the terminal, the last free-text column
is cut first (with an ellipsis), then columns are dropped from the right, and a footer says how many.
Markdown, CSV and JSON are for documents and scripts: never cut, and CSV/JSON keep the raw values.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Callable

FORMATS = ("table", "markdown", "csv", "json")
SEP = "  "  # between table columns
MIN_FREE_TEXT = 12  # a free-text column narrower than this says too little to keep: drop it instead
ELLIPSIS = "…"  # "..." where stdout cannot encode it (see _ellipsis)

Format = str | Callable[[object], str]


def terminal_width() -> int | None:
    """$COLUMNS, else the terminal's width; None (no limit) when stdout is not a terminal and COLUMNS is
    unset: output piped to a file or a script keeps every column uncut."""
    if not os.environ.get("COLUMNS", "").strip().isdigit() and not sys.stdout.isatty():
        return None
    return max(20, shutil.get_terminal_size().columns)


def _cell(value, fmt: Format | None) -> str:
    """One value as table text: the column's format when given, else a compact default; always one line."""
    if value is None:
        text = "-"
    elif fmt is not None and not isinstance(value, str):
        text = fmt(value) if callable(fmt) else format(value, fmt)
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return " ".join(text.split())  # user-given names may hold newlines or tabs


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _columns(rows: list[dict], columns: list[str] | None, wide: bool, wide_columns: list[str] | None) -> list[str]:
    if wide and wide_columns:
        return list(wide_columns)
    if columns:
        return list(columns)
    if wide_columns:
        return list(wide_columns)
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def _ellipsis() -> str:
    try:
        ELLIPSIS.encode(sys.stdout.encoding or "ascii")
        return ELLIPSIS
    except (LookupError, UnicodeEncodeError):
        return "..."


def _truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    mark = _ellipsis()
    return text[:max(0, width - len(mark))] + mark


def _fit(cols: list[str], cells: dict[str, list[str]], numeric: dict[str, bool], width: int, head: dict):
    """The columns kept and their widths so that the table is at most `width` wide; how many were dropped."""
    cols = list(cols)
    widths = {c: max([len(head[c])] + [len(s) for s in cells[c]]) for c in cols}
    free = next((c for c in reversed(cols) if not numeric[c]), None)  # the last free-text column
    dropped = 0
    while True:
        total = sum(widths[c] for c in cols) + len(SEP) * (len(cols) - 1)
        if total <= width or len(cols) == 1:
            break
        if free in cols:
            room = widths[free] - (total - width)
            if room >= max(MIN_FREE_TEXT, len(head[free])):
                widths[free] = room
                break
        cols.pop()  # rightmost = lowest priority
        dropped += 1
    if len(cols) == 1:  # one column left: cut it to the width
        widths[cols[0]] = min(widths[cols[0]], width)
    return cols, widths, dropped


def _table(rows, cols, formats, head: dict, width: int | None) -> str:
    cells = {c: [_cell(r.get(c), formats.get(c)) for r in rows] for c in cols}
    numeric = {c: bool(rows) and all(_is_number(r.get(c)) or r.get(c) is None for r in rows) for c in cols}
    if width is None:
        widths, dropped = {c: max([len(head[c])] + [len(s) for s in cells[c]]) for c in cols}, 0
    else:
        cols, widths, dropped = _fit(cols, cells, numeric, width, head)

    def line(values: list[str]) -> str:
        parts = [(str.rjust if numeric[c] else str.ljust)(_truncate(v, widths[c]), widths[c])
                 for c, v in zip(cols, values, strict=True)]
        return SEP.join(parts).rstrip()

    out = [line([head[c] for c in cols])] + [line([cells[c][i] for c in cols]) for i in range(len(rows))]
    if dropped:
        out.append(wrap(f"({dropped} column{'s' if dropped > 1 else ''} hidden: --wide shows them)", width))
    return "\n".join(out)


def _markdown(rows, cols, formats, head: dict) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|")

    out = ["| " + " | ".join(esc(head[c]) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(esc(_cell(r.get(c), formats.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _csv(rows, cols) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue().rstrip("\n")


def render(rows: list[dict], fmt: str, columns: list[str] | None = None, wide: bool = False,
           width: int | None = None, wide_columns: list[str] | None = None,
           formats: dict[str, Format] | None = None, headers: dict[str, str] | None = None) -> str:
    """`rows` as text in `fmt` (no final newline).

    columns: the default view, in priority order; wide_columns: every column (--wide); width: the table's
    limit (default: the terminal's; ignored with --wide and by the other formats); formats: per column, a
    format spec (",.0f") or a function for table and markdown cells (CSV and JSON keep the raw values);
    headers: per column, the title a table or markdown shows (CSV and JSON keep the keys, for scripts).
    JSON is the list of row dicts with every column of the wide view.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    formats = formats or {}
    if fmt == "json":
        cols = _columns(rows, None, True, wide_columns)
        return json.dumps([{c: r.get(c) for c in cols} for r in rows], indent=2, default=str)
    cols = _columns(rows, columns, wide, wide_columns)
    if fmt == "csv":
        return _csv(rows, cols)
    head = {c: " ".join(str((headers or {}).get(c, c)).split()) for c in cols}
    if fmt == "markdown":
        return _markdown(rows, cols, formats, head)
    return _table(rows, cols, formats, head, None if wide else (width or terminal_width()))


def wrap(text: str, width: int | None = None) -> str:
    """A free-text line (a header, a summary) wrapped to the terminal, continuation lines indented."""
    width = width or terminal_width()
    if width is None:
        return text
    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)) or text


class _FormatAction(argparse.Action):
    """--format F; --format json also sets args.json, which the commands' JSON path reads."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.format = values
        namespace.json = values == "json"


class _JsonAction(argparse.Action):
    """--json: the alias of --format json."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.format = "json"
        namespace.json = True


def add_format_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --format {table,markdown,csv,json} (args.format, default table), --wide, and --json (alias of
    --format json; args.json is True for either)."""
    parser.add_argument("--format", choices=FORMATS, default="table", action=_FormatAction,
                        help="table (fits the terminal: $COLUMNS), markdown, csv or json (default table)")
    parser.add_argument("--wide", action="store_true", help="every column, nothing cut")
    parser.add_argument("--json", action=_JsonAction, default=False, help="same as --format json")


def json_requested(argv: list[str]) -> bool:
    """Whether a command line asks for JSON, read from the words themselves (for errors found before argparse
    has made args: a usage error must still answer in JSON)."""
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == "--json" or word == "--format=json" or (word == "--format" and argv[i + 1:i + 2] == ["json"]):
            return True
    return False
