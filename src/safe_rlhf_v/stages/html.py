"""Tiny, dependency-free HTML rendering for the pages stages publish to the Kubeflow UI.

KFP shows an HTML artifact in a sandboxed frame, so pages must be self-contained: inline CSS, no
scripts, no external links.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:0.9rem;vertical-align:top}
th{background:#f3f3f3}.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
"""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; cells are escaped, except those wrapped by `status`."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{cell if isinstance(cell, _Raw) else escape(str(cell))}</td>" for cell in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Markup produced here, safe to embed unescaped."""


def status(ok: bool) -> str:
    """A coloured pass/fail marker for a table cell."""
    return _Raw('<span class="ok">pass</span>' if ok else '<span class="bad">FAIL</span>')


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole page: a title and (heading, html) sections."""
    body = "".join(f"<h2>{escape(heading)}</h2>{content}" for heading, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
