"""Is an answer a caption at all? Refusals and apologies are not captions and never reach captions_all.csv.

Plain function, no I/O: the backend calls it on every answer, the quality report on every stored caption.
"""

from __future__ import annotations

import re
import unicodedata

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
    """True when `text` holds no letter and no digit (Unicode categories L* and N*).

    An answer of only punctuation, symbols, control or invisible characters (`…`, `\x00`, U+FFFD, a
    zero-width space, whitespace) describes nothing: it is `empty`, never a caption, never exported.
    """
    if text is None:
        return True
    return not any(unicodedata.category(ch)[0] in "LN" for ch in text)


def clean_text(text: str) -> str:
    """`text` as it may be stored: control characters removed, line breaks kept as `\n`.

    Decided: `\r\n` and a lone `\r` become `\n`, a tab becomes a space, every other control character
    (Unicode Cc: NUL, ESC, BEL, DEL, C1 controls) is dropped, and so are lone surrogates (Cs), which no
    UTF-8 file can hold. Format characters (Cf: zero-width joiners) stay: some scripts need them.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cs"))
