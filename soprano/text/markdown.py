"""Markdown and chat formatting to plain lines: what a reader says, not the markup around it.

LLM answers come in markdown. The model must hear the words, not "asterisk" or a URL spelled out,
so the text is parsed with markdown-it-py (CommonMark plus GFM tables and strikethrough) and each
block is rendered as its own line; `clean_text` then ends every line as a sentence. Raw HTML is
left as text (upstream read it), and bare URLs stay text too: only link syntax hides its URL.

Fix: upstream had no markdown step, so it read "1." list markers as "one.", spelled every link's
URL, and kept "#" headings and table pipes only by luck of its character whitelist.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token

_MARKUP = re.compile(
    r"[*_`#>\[\]|\\~&]|^[ \t]*(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)|^ {4}|^[ \t]*(?:=+|-+)[ \t]*$",
    re.MULTILINE,
)
"""Text without any of these cannot hold markdown, so it skips the parser (and stays as it is)."""

_ARITHMETIC_STAR = re.compile(r"(?<=\d)\s?\*\s?(?=\d)")
""""2*3*4" is a product, not "3" in italics: such stars are escaped before parsing."""

_TASK_BOX = re.compile(r"^\[[ xX]\] ")
"""A task list's "[ ]" or "[x]" box, silent like the bullet before it."""

_CELL_SEPARATOR = ", "
"""Table cells are read in order with a short pause between them."""


@functools.cache
def _parser() -> MarkdownIt:
    """markdown-it-py is imported only when text looks like markdown (plain text never pays)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def markdown_to_text(text: str) -> str:
    """Plain text of markdown: one line per block (paragraph line, heading, list item, row).

    Markers are silent: emphasis, headings, quotes, code fences, bullets and list numbers,
    rules. A link says its text, an image its alt text. Text without markdown is returned as is.
    """
    if not _MARKUP.search(text):
        return text
    escaped = _ARITHMETIC_STAR.sub(lambda match: match.group(0).replace("*", "\\*"), text)
    tokens = _parser().parse(escaped)
    numbered = _single_item_numbers(tokens)
    lines: list[str] = []
    row: list[str] | None = None
    prefix = ""
    for token in tokens:
        if token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            lines.append(_CELL_SEPARATOR.join(cell for cell in row if cell))
            row = None
        elif token.type == "inline":
            words = _inline_text(token.children or [])
            if token.level > 1:
                words = _TASK_BOX.sub("", words)
            if row is not None:
                row.append(words.replace("\n", " ").strip())
                continue
            first, *rest = words.split("\n")
            lines += [prefix + first, *rest]
            prefix = ""
        elif token.type in ("fence", "code_block"):
            lines.extend(token.content.split("\n"))
        elif token.type == "list_item_open" and id(token) in numbered:
            # A lone "2026. What a year." is a sentence that starts with a number, not a list.
            prefix = f"{token.info}{token.markup} "
    return "\n".join(_pipes_as_cells(line) for line in lines if line.strip())


def _pipes_as_cells(line: str) -> str:
    """A row of pipes outside a table (say, before its delimiter row arrives) reads like one."""
    if "|" not in line:
        return line
    return _CELL_SEPARATOR.join(cell.strip() for cell in line.strip().strip("|").split("|"))


def ends_with_list(text: str) -> bool:
    """True if the last block of `text` is a list (the stream may cut between its items)."""
    tokens = [token for token in _parser().parse(text) if token.level == 0]
    return bool(tokens) and tokens[-1].type in ("bullet_list_close", "ordered_list_close")


def _single_item_numbers(tokens: list[Token]) -> set[int]:
    """Items of ordered lists that have one item, numbered other than 1: their number is read."""
    kept: set[int] = set()
    lists: list[tuple[bool, list[Token]]] = []  # open lists, innermost last: (ordered, items)
    for token in tokens:
        if token.type in ("ordered_list_open", "bullet_list_open"):
            lists.append((token.type == "ordered_list_open", []))
        elif token.type == "list_item_open" and lists:
            lists[-1][1].append(token)
        elif token.type in ("ordered_list_close", "bullet_list_close") and lists:
            ordered, items = lists.pop()
            if ordered and len(items) == 1 and items[0].info != "1":
                kept.add(id(items[0]))
    return kept


def _host(url: str) -> str:
    """The host of a URL, or the address of a mailto link."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or parts.path


def _inline_text(children: list[Token]) -> str:
    """The words of an inline run: text, code, link text and image alt text; breaks stay lines."""
    parts: list[str] = []
    in_autolink = False
    for child in children:
        if child.type == "link_open" and child.markup == "autolink":
            # "<https://example.com/a>" has no other text: say where it goes, "example.com".
            in_autolink = True
            parts.append(_host(str(child.attrs.get("href", ""))))
        elif child.type == "link_close":
            in_autolink = False
        elif in_autolink:
            continue
        elif child.type in ("text", "code_inline", "html_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif child.type == "image":
            parts.append(_inline_text(child.children or []))
    return "".join(parts)
