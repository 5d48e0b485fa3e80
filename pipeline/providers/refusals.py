"""Is an answer a caption at all? Refusals and apologies are not captions and never reach captions_all.csv.

Plain function, no I/O: the backend calls it on every answer, the quality report on every stored caption.
"""

from __future__ import annotations

import re

# An answer that *starts* like one of these and is short is an apology, not a description.
_APOLOGY = re.compile(
    r"^\s*(i['’]m sorry|i am sorry|sorry[,.!]|i apologi[sz]e|i can(?:no|['’])t (?:help|assist|provide|describe|identify)"
    r"|i(?: am|['’]m) (?:unable|not able) to|as an ai\b|unfortunately,? i can(?:no|['’])t"
    r"|抱歉|对不起|很抱歉|我无法|我不能)",
    re.IGNORECASE,
)
_MAX_APOLOGY_CHARS = 300


def looks_like_refusal(text: str | None) -> bool:
    """True for a short answer that only apologises or declines (English or Chinese)."""
    if text is None:
        return False
    t = text.strip()
    if not t:
        return False
    return len(t) <= _MAX_APOLOGY_CHARS and bool(_APOLOGY.match(t))


def is_empty(text: str | None) -> bool:
    return text is None or not text.strip()
