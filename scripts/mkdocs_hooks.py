"""MkDocs hooks of the manual (mkdocs.yml, ``hooks:``): where the pages are
written for GitHub's Markdown and Python-Markdown reads them otherwise.

The manual's examples that tests/test_readme.py runs are marked by a second
word in their fence's info string (```` ```sh runnable ````). GitHub shows only
the first word, but Python-Markdown does not read such a line as a fence at all,
so the marker is taken off before a page is rendered.
"""

from __future__ import annotations

import re
from typing import Any

_MARKED_FENCE = re.compile(
    r"^(?P<fence> *(?:`{3,}|~{3,})[\w+-]+)[ \t]+runnable[ \t]*$", re.MULTILINE
)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return _MARKED_FENCE.sub(r"\g<fence>", markdown)


_ESCAPED_PIPE_IN_CODE = re.compile(r"<code>[^<]*\\\|[^<]*</code>")


def on_page_content(html: str, **_: Any) -> str:
    """A ``|`` inside code in a table cell is written ``\\|`` (GitHub's way);
    Python-Markdown keeps the backslash there, so it is taken off."""
    return _ESCAPED_PIPE_IN_CODE.sub(lambda code: code[0].replace("\\|", "|"), html)
