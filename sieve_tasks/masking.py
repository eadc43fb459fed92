"""Medium-phrase masking, as the official SIEVE code applies it before embedding."""

from __future__ import annotations

import re
from collections.abc import Callable

MEDIUM_PHRASES: tuple[str, ...] = (
    "an image of", "a photo of", "stock photo", "photo stock", "a photo", "an image", "image", "photo",
)

# The longer list from the official code (not its default).
LONG_PHRASES: tuple[str, ...] = (
    "an image of", "a photo of", "an icon of", "an illustration of", "a template of", "a thumbnail of",
    "a vector of", "stock photo", "photo stock", "a photo", "an image", "an icon", "an illustration",
    "a template", "a thumbnail", "a vector", "image", "photo", "icon", "illustration", "template",
    "thumbnail", "vector", "free", "print", "sale", "quot", "png", "jpeg", "jpg",
)

# The only characters besides ASCII letters that Python's case-insensitive matching equates with an ASCII letter, or
# whose lower case holds one (İ ı ſ K; checked over all of Unicode in the tests)
ASCII_LOOKALIKES = re.compile("[\u0130\u0131\u017f\u212a]")

PHRASE_LISTS = {"medium": MEDIUM_PHRASES, "long": LONG_PHRASES}
MODES = ("substring", "word")


def make_masker(phrases: str = "medium", mode: str = "substring") -> Callable[[str], str]:
    """A function removing the phrases from a text.

    ``substring`` is the official rule: each phrase, in list order, removed case-insensitively wherever
    it occurs ("images" becomes "s"). ``word`` only removes whole words.
    """
    if phrases not in PHRASE_LISTS:
        raise ValueError(f"unknown phrase list {phrases!r}; choose one of {sorted(PHRASE_LISTS)}")
    if mode not in MODES:
        raise ValueError(f"unknown masking mode {mode!r}; choose one of {list(MODES)}")
    boundary = r"\b" if mode == "word" else ""
    rules = [(p.lower(), re.compile(boundary + re.escape(p) + boundary, re.IGNORECASE)) for p in PHRASE_LISTS[phrases]]
    if not all(phrase.isascii() for phrase, _ in rules):
        raise ValueError(f"phrase list {phrases!r}: the masker's fast path expects ASCII phrases")

    def mask(text: str) -> str:
        # without those four characters, a text matches an ASCII phrase case-insensitively only where its lower case
        # contains the phrase: a test ~10x cheaper than the regex (most texts hold no phrase); other texts take
        # every rule as it is
        if text.isascii() or ASCII_LOOKALIKES.search(text) is None:
            lowered = text.lower()
            for phrase, pattern in rules:
                if phrase in lowered:
                    text = pattern.sub("", text)
                    lowered = text.lower()
            return text
        for _, pattern in rules:
            text = pattern.sub("", text)
        return text

    return mask
