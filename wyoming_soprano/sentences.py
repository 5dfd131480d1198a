"""Cutting streamed text into pieces that the engine splits exactly as it splits the whole text.

Clients stream text in arbitrary fragments (Home Assistant cuts inside words). A piece of the
text may be synthesized before the rest arrives only if the engine's front end
(`soprano.text.prepare_text`) gives the same sentences for the piece and the rest as for the
whole: the stream then sounds exactly like the one-shot `synthesize` of the same text. The engine
merges sentences shorter than MIN_SENTENCE_LENGTH into a neighbour, so a cut is only taken once
the text after it starts with a sentence long enough never to be merged back across the cut.

The one normalisation that reaches across sentences is the bracketed aside, which the engine
reads with commas once its closing bracket exists. So a cut after an unclosed opening bracket
waits for the closing one, but only while the text after the cut stays under MAX_SENTENCE_LENGTH:
an emoticon such as ":(" must not hold a long answer back. Past that (an aside longer than that,
or a stray bracket closed much later), the released sentences keep the bracket unread.

Markdown reaches across lines too: a list item, a quote or a code fence is read by where its
lines start and what came before them. Once the text has such a block, or the text after a cut
would open with one, it is cut only at a paragraph break (a blank line, the next line not
indented, no code fence open), where markdown starts afresh, or between two items of a list, so
that the text after the cut parses alone as it does in the whole.
"""

from __future__ import annotations

import re

from soprano.text import (
    MAX_SENTENCE_LENGTH,
    MIN_SENTENCE_LENGTH,
    clean_text,
    prepare_text,
    split_sentences,
)
from soprano.text.markdown import ends_with_list

_CUT_CANDIDATE = re.compile(r"[.!?;:)\]}\"'”’…]\s+|\n\s*")
"""Where a sentence may end in raw text: after closing punctuation and whitespace, or a line."""

_BLOCK_MARKUP = re.compile(
    r"^[ \t]*(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)"
    r"|^[ \t]*(?:>|#{1,6}(?:[ \t]|$)|```|~~~|\||[=-]+[ \t]*$)"
    r"|^ {4}",
    re.MULTILINE,
)
"""A line that opens a markdown block (list, quote, heading, fence, table, rule, code)."""
_LIST_ITEM = re.compile(r"(?:[-+*]|\d{1,9}[.)])[ \t]")
"""A list item at the start of a line, not indented."""
_CODE_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)
_PARAGRAPH_BREAK_AT_END = re.compile(r"\n[ \t]*\n\s*(?<=\n)$")

CUTS_TRIED = 16
"""Candidate cuts tried per fragment, from the end: bounds the work on pathological text."""
MAX_PENDING = 4 * MAX_SENTENCE_LENGTH
"""Characters held back at most. Text that runs on longer without a cut that keeps the
sentences of the whole (no sentence end, an endless code block) is cut anyway, at its last
sentence end or word boundary, and spoken: only such text can sound different streamed, and
every fragment costs work bounded by this, however the client sends its text."""


class SentenceStream:
    """Collects text fragments and releases the sentences of the longest final prefix.

    The cut is the last one after which no later text can change the sentences before it.
    """

    def __init__(self) -> None:
        self._pending = ""

    def add(self, fragment: str) -> list[str]:
        """Append a fragment; return the engine's sentences that are final now (maybe none)."""
        self._pending += fragment
        released: list[str] = []
        while len(self._pending) > MAX_PENDING:
            cut = _forced_cut(self._pending[:MAX_PENDING])
            released += prepare_text(self._pending[:cut])
            self._pending = self._pending[cut:]
        return released + self._release()

    def _release(self) -> list[str]:
        """The sentences before the last cut that later text cannot change, if any."""
        text = self._pending
        cuts = [match.end() for match in _CUT_CANDIDATE.finditer(text)]
        whole: list[str] | None = None
        for cut in reversed(cuts[-CUTS_TRIED:]):
            head, tail = text[:cut], text[cut:]
            if not _starts_with_long_sentence(tail):
                continue
            if _ends_inside_brackets(head) and len(tail) < MAX_SENTENCE_LENGTH:
                continue
            if not _ends_between_blocks(head, tail):
                continue
            whole = prepare_text(text) if whole is None else whole
            head_sentences = prepare_text(head)
            if head_sentences and head_sentences + prepare_text(tail) == whole:
                self._pending = tail
                return head_sentences
        return []

    def finish(self) -> list[str]:
        """The sentences of everything not yet released; the stream is empty afterwards."""
        rest, self._pending = self._pending, ""
        return prepare_text(rest)


def _forced_cut(text: str) -> int:
    """Where to cut text that is held back too long: after its last sentence end, else after
    its last space, else (one endless word) at its end."""
    ends = [match.end() for match in _CUT_CANDIDATE.finditer(text)]
    if ends:
        return ends[-1]
    space = text.rfind(" ")
    return space + 1 if space > 0 else len(text)


def _ends_inside_brackets(text: str) -> bool:
    """True if the last bracket in `text` opens an aside."""
    last_opening = max(text.rfind(bracket) for bracket in "([{")
    last_closing = max(text.rfind(bracket) for bracket in ")]}")
    return last_opening > last_closing


def _ends_between_blocks(head: str, tail: str) -> bool:
    """True if markdown `tail` parses alone as it does after `head` (see the module doc).

    Between two items of a list is such a place too: the items after the cut, a list of their
    own, are read the same (their markers silent; the engine's check against the whole text
    holds back a lone numbered item, whose number a one-item list keeps).
    """
    # A tail that opens with a block ("2) ...") may be a paragraph's next line in the whole.
    if not _BLOCK_MARKUP.search(head) and not _BLOCK_MARKUP.match(tail):
        return True
    if len(_CODE_FENCE.findall(head)) % 2:
        return False
    if _PARAGRAPH_BREAK_AT_END.search(head):
        return True
    last_line = head.rstrip("\n").rpartition("\n")[2]
    return (
        head.endswith("\n")
        and bool(_LIST_ITEM.match(last_line))
        and bool(_LIST_ITEM.match(tail))
        and ends_with_list(head)
    )


def _starts_with_long_sentence(text: str) -> bool:
    """True if the first sentence of `text` is already too long to be merged with another."""
    sentences = split_sentences(clean_text(text))
    return bool(sentences) and len(sentences[0]) >= MIN_SENTENCE_LENGTH
