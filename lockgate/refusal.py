"""Refusal phrases: when a model's answer is a refusal of the request (kernel).

One home for the patterns the ext_proc's body analyzers (``refusal`` of an observation) and the
controller's heuristic evaluator (its refusal factor) both use. Pure: regexes only.

* :data:`DEFAULT_REFUSAL_PATTERNS` — the phrases, as regexes matched case-insensitively.
* :data:`DEFAULT_REFUSAL_FAST` — a hand-optimised equivalent for the hot path, matched against the
  lower-cased text without IGNORECASE (equivalence property-tested in
  tests/unit/test_analyzers_properties.py).
* :func:`compile_patterns` and :func:`search_refusal` — compile once, search a text window.
"""

from __future__ import annotations

import re
from typing import Pattern

__all__ = ["DEFAULT_REFUSAL_FAST", "DEFAULT_REFUSAL_PATTERNS", "compile_patterns", "search_refusal"]

_APOS = "['\u2019]"  # straight or typographic apostrophe
_CANT = rf"(?:can(?:not|{_APOS}t| not)|won{_APOS}t|will not)"

#: Default refusal phrases (regex, matched case-insensitively against the
#: first ``refusal_scan_chars`` characters of the content).  Deliberately
#: conservative: phrased as a refusal of the *request*, so that e.g.
#: "I can't help but notice" does not match.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    rf"\bI(?:{_APOS}m| am) sorry,? but I(?: (?:can|won|will not|am (?:not able|unable))|{_APOS}m (?:not able|unable))",
    rf"\bI {_CANT} (?:help|assist)(?: you)? with\b",
    rf"\bI {_CANT} (?:assist|comply|fulfill|fulfil|help) (?:you |with )?(?:that|this|your)\b",
    rf"\bI {_CANT} (?:assist|comply)\b",
    rf"\bI {_CANT} provide (?:that|this|any|help|assistance|information on)\b",
    rf"\bI(?:{_APOS}m| am) (?:unable|not able) to (?:help|assist|comply|fulfill|fulfil|provide)\b",
    rf"\bI(?:{_APOS}m| am) not (?:allowed|permitted) to\b",
    r"\bI must (?:respectfully )?(?:decline|refuse)\b",
    rf"\bAs an AI(?: language model)?,? I {_CANT}\b",
)


# Hand-optimised equivalent of DEFAULT_REFUSAL_PATTERNS, matched against the
# *lowercased* scan window without IGNORECASE.  Every branch but one starts
# with a literal ("i" / "as"; word boundaries are checked by a lookbehind
# *after* it), which lets the regex engine skip ahead with a fast literal
# scan instead of trying a 9-way case-insensitive alternation at every
# position (~20x faster on typical text; equivalence is property-tested
# in tests/unit/test_analyzers_properties.py).
DEFAULT_REFUSAL_FAST: tuple[Pattern[str], ...] = (
    re.compile(
        rf"i(?<!\wi)(?:"
        rf"(?:{_APOS}m| am) (?:"
        rf"sorry,? but i(?: (?:can|won|will not|am (?:not able|unable))|{_APOS}m (?:not able|unable))"
        rf"|(?:unable|not able) to (?:help|assist|comply|fulfill|fulfil|provide)\b"
        rf"|not (?:allowed|permitted) to\b)"
        rf"| {_CANT} (?:"
        rf"(?:help|assist)(?: you)? with\b"
        rf"|(?:assist|comply|fulfill|fulfil|help) (?:you |with )?(?:that|this|your)\b"
        rf"|(?:assist|comply)\b"
        rf"|provide (?:that|this|any|help|assistance|information on)\b)"
        rf"| must (?:respectfully )?(?:decline|refuse)\b)"
    ),
    re.compile(rf"as(?<!\was) an ai(?: language model)?,? i {_CANT}\b"),
)


def compile_patterns(patterns: tuple[str, ...]) -> tuple[Pattern[str], ...]:
    """``patterns`` as few compiled case-insensitive regexes as possible (one alternation when they
    combine); an invalid pattern raises ``re.error`` here, at config time."""
    if not patterns:
        return ()
    try:  # one combined alternation: a single pass over the text
        return (re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE),)
    except re.error:
        # e.g. a pattern with inline global flags cannot be embedded; fall back
        # to one regex per pattern (invalid patterns raise here, at config time).
        return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def search_refusal(head: str, fast: tuple[Pattern[str], ...], others: tuple[Pattern[str], ...]) -> bool:
    """True if ``head`` (the scan window of an answer) matches a refusal: ``fast`` patterns
    (:data:`DEFAULT_REFUSAL_FAST`, matched on the lower-cased window) or ``others`` (compiled with
    :func:`compile_patterns`, IGNORECASE)."""
    if fast:
        low = head.lower()
        if not low.isascii():
            # IGNORECASE treats dotless "ı" and dotted "İ" (lowercased to
            # "i" + U+0307) like "i"; mirror that for exact equivalence.
            low = low.replace("\u0131", "i").replace("i\u0307", "i")
        for rx in fast:
            if rx.search(low):
                return True
    for rx in others:
        if rx.search(head):
            return True
    return False
