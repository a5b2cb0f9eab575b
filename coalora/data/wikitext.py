"""Plain text from a MediaWiki XML dump: article records, and a small wikitext cleaner.

:func:`read_dump` streams the ``<page>`` elements of a (bz2-compressed) ``pages-articles`` dump and yields
one :class:`Article` per main-namespace page that is not a redirect. :func:`clean_wikitext` turns an
article's wikitext into prose, in this order (each step assumes the ones before it):

1. comments, ``<ref>`` footnotes and tags whose body is not prose (``<math>``, ``<gallery>``, …) go; other
   HTML tags (``<sup>``, ``<span>``, ``<blockquote>``, …) are dropped but their text stays;
2. templates ``{{…}}`` (infoboxes, citations, navboxes; nested) and tables ``{|…|}`` go whole;
3. links: ``[[File:…]]``/``[[Image:…]]``/``[[Category:…]]`` and interlanguage links go whole (a file
   caption may nest links, so brackets are matched, not pattern-matched); ``[[target|label]]`` → label,
   ``[[target]]`` → target, ``[http://… label]`` → label, a bare ``[http://…]`` goes;
4. sections that are lists of links or sources ("See also", "References", "External links", …) go from
   their heading to the next heading of the same or a higher level; other headings ``== X ==`` become the
   line ``X``;
5. bold/italic quotes, list and indent markers, magic words and HTML entities go; whitespace is tidied.

It is deliberately small: a template that carries prose (``{{lang|fr|…}}``, ``{{convert|5|km}}``) is
dropped with the rest, leaving an occasional gap in a sentence. That is the price of a cleaner that fits on
a few screens; it does not affect what the data is for (held-out text for perplexity, text to fine-tune on).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator
from urllib.parse import quote

# Sections whose content is references, link lists or bibliography, not prose (compared lower-cased).
DROPPED_SECTIONS = frozenset({
    "see also", "references", "external links", "further reading", "notes", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited", "gallery",
    "other", "related articles",
})
# Link namespaces whose links are not part of the sentence they stand in.
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
# Tags whose whole body goes (footnotes, formulas, galleries, code): their text is not prose.
DROPPED_TAGS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source", "imagemap",
                "chem", "ce", "graph", "mapframe", "hiero", "templatedata", "references")

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_SELF_CLOSING = re.compile(r"<(?:%s)\b[^>]*/>" % "|".join(DROPPED_TAGS), re.I)
_TAG_BODY = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(DROPPED_TAGS), re.I | re.S)
_BREAK = re.compile(r"<br\s*/?>", re.I)
_ANY_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^>]*?/?>")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_QUOTES = re.compile(r"'{2,5}")
_MAGIC = re.compile(r"__[A-Z]+__")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?:")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_OPENING_SEPARATOR = re.compile(r"\(\s*[,;:]\s*")      # "(; born 1947)" after a dropped template
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")


@dataclass(frozen=True)
class Article:
    """One main-namespace page of a dump: its title, id, last revision's timestamp and raw wikitext."""

    title: str
    page_id: int
    timestamp: str
    wikitext: str

    def url(self, base: str) -> str:
        """The article's address: ``base`` (``https://en.wikipedia.org/wiki/``) + title, spaces as ``_``."""
        return base + quote(self.title.replace(" ", "_"), safe="_()',!:/-.")


def _strip_blocks(text: str, open_: str, close: str) -> str:
    """Remove every ``open_ … close`` block, nested ones included (an unclosed block runs to the end)."""
    out, depth, i, start = [], 0, 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
            start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Remove ``{| … |}`` tables (nested too); they are line-anchored in wikitext."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        elif depth and stripped.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _link_text(inner: str) -> str:
    """What an internal link ``[[inner]]`` reads as in its sentence ('' for files, categories, interwiki)."""
    target, _, label = inner.partition("|")
    target = target.strip()
    if target.lower().startswith(DROPPED_LINK_PREFIXES) or _INTERLANGUAGE.match(target):
        return ""
    target = target.lstrip(":")
    if label.strip():
        return label.rsplit("|", 1)[-1]
    # [[Page#Section]] reads as the page, [[#Section]] as the section; the pipe trick [[Page (x)|]] as Page
    shown = target.split("#", 1)[0] or target.lstrip("#")
    return re.sub(r"\s*\([^)]*\)$", "", shown) if _ == "|" else shown


def _replace_links(text: str) -> str:
    """Resolve ``[[…]]`` links innermost first, so a file caption holding links goes whole."""
    out: list[str] = []
    stack: list[int] = []          # positions in ``out`` where each open ``[[`` began
    i = 0
    while i < len(text):
        if text.startswith("[[", i):
            stack.append(len(out))
            out.append("[[")
            i += 2
        elif stack and text.startswith("]]", i):
            begin = stack.pop()
            inner = "".join(out[begin + 1:])
            del out[begin:]
            out.append(_link_text(inner))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _drop_sections(lines: list[str]) -> list[str]:
    """Drop the link/reference sections (DROPPED_SECTIONS); turn the other headings into plain lines."""
    kept, skip_level = [], 0
    for line in lines:
        heading = _HEADING.match(line.strip())
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in DROPPED_SECTIONS else 0
            if not skip_level and title:
                kept += ["", title]
            continue
        if not skip_level:
            kept.append(line)
    return kept


def _tidy_line(line: str) -> str:
    line = line.strip()
    line = re.sub(r"^[*#:;]+\s*", "", line)                    # list and indent markers
    line = _EMPTY_PARENS.sub("", line)
    line = _OPENING_SEPARATOR.sub("(", line)
    line = _SPACES.sub(" ", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return line.strip()


def clean_wikitext(wikitext: str) -> str:
    """Prose from an article's wikitext (module docstring: what goes, in which order).

    Returns:
        paragraphs separated by one blank line; headings as their own lines; no markup.
    """
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSING.sub("", text)
    text = _TAG_BODY.sub("", text)
    text = _BREAK.sub("\n", text)
    text = _ANY_TAG.sub("", text)
    text = _strip_blocks(text, "{{", "}}")
    text = _strip_tables(text)
    text = _replace_links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    lines = [_tidy_line(line) for line in _drop_sections(text.split("\n"))]
    # paragraphs: runs of non-empty lines joined by newlines, one blank line between runs
    paragraphs, current = [], []
    for line in lines + [""]:
        if line and any(ch.isalnum() for ch in line):
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return "\n\n".join(paragraphs)


def _local(tag: str) -> str:
    """An element's tag without its XML namespace (dumps use versioned export namespaces)."""
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, *path: str) -> str | None:
    node = element
    for name in path:
        node = next((child for child in node if _local(child.tag) == name), None)
        if node is None:
            return None
    return node.text


def _base_url(base: str | None) -> str:
    """The article address prefix from the dump's ``<siteinfo><base>`` (``…/wiki/Main_Page`` → ``…/wiki/``)."""
    if not base:
        raise ValueError("the dump has no <siteinfo><base>: cannot tell the wiki's article addresses")
    return base.rsplit("/", 1)[0] + "/"


def read_dump(handle: IO[bytes]) -> tuple[str, Iterator[Article]]:
    """Stream a MediaWiki XML dump.

    Args:
        handle: the dump, uncompressed bytes (wrap a ``.bz2`` in :func:`bz2.open`).

    Returns:
        ``(base, articles)``: the address prefix of the wiki's articles, and an iterator over the
        main-namespace (``ns`` 0) pages that are not redirects, in dump order.
    """
    events = ET.iterparse(handle, events=("end",))
    base = None
    for _, element in events:
        if _local(element.tag) == "siteinfo":
            base = _child_text(element, "base")
            break
    prefix = _base_url(base)

    def articles() -> Iterator[Article]:
        for _, page in events:
            if _local(page.tag) != "page":
                continue
            is_redirect = any(_local(child.tag) == "redirect" for child in page)
            if _child_text(page, "ns") == "0" and not is_redirect:
                yield Article(title=_child_text(page, "title") or "", page_id=int(_child_text(page, "id") or 0),
                              timestamp=_child_text(page, "revision", "timestamp") or "",
                              wikitext=_child_text(page, "revision", "text") or "")
            page.clear()  # keep memory flat over a large dump

    return prefix, articles()


def read_dump_file(path: Path) -> tuple[str, list[Article]]:
    """:func:`read_dump` over a file (``.bz2`` decompressed on the fly), all articles read."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as handle:
        base, articles = read_dump(handle)
        return base, list(articles)
