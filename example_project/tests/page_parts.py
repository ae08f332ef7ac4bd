"""Reading the dashboard's HTML back: its timeline bars and its data section."""

from __future__ import annotations

import re

BAR = re.compile(
    r'<span class="tl-desc">(?P<label>[^<]*)</span>'
    r'<span class="tl-thread">(?P<thread>[^<]*)</span>.*?'
    r'data-start-ms="(?P<start>[^"]*)" data-ms="(?P<ms>[^"]*)"',
    re.S,
)


def bars(html: str) -> list[dict[str, str]]:
    """The timeline's bars, as the page draws them."""
    return [m.groupdict() for m in BAR.finditer(html)]


def data_section(html: str) -> str:
    """The dashboard's data, without the timeline and code under it."""
    return html.split('<div class="grid stats">', 1)[1].split('id="timeline"', 1)[0]
