"""Responses as the annotator page shows them: markdown rendered to HTML that cannot run anything.

An annotator judges style as well as content, so ``## Answer`` must read as a heading and ``**x**``
as bold, not as raw markup. The text comes from whoever published the pair, so the HTML is made
safe twice: markdown-it renders with raw HTML off (a ``<script>`` or ``<img onerror>`` in the text
comes out escaped, as text) and refuses ``javascript:``/``vbscript:``/``data:`` links, then nh3
(the ammonia sanitiser) keeps only the tags and attributes markdown produces, links only to
http(s) and mailto, with ``rel="noopener noreferrer nofollow"``. Images are not rendered: the page
would fetch any address a pair names; ``![alt](url)`` shows as text and a link instead.
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

# What CommonMark (plus tables and strikethrough) renders; nothing else survives the sanitiser.
TAGS = {"p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "s", "del", "code", "pre",
        "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td"}
ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "code": {"class"}, "th": {"style"}, "td": {"style"}}
URL_SCHEMES = {"http", "https", "mailto"}

_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]).disable("image")


def markdown_html(text: str) -> str:
    """``text`` as sanitised HTML for the page (the source stays available as text beside it)."""
    return nh3.clean(_MD.render(text), tags=TAGS, attributes=ATTRIBUTES, url_schemes=URL_SCHEMES,
                     link_rel="noopener noreferrer nofollow", filter_style_properties={"text-align"})
