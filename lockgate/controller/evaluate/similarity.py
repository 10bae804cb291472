"""Similarity of two answers (canary vs baseline on the same input), model-free and pluggable.

Interface: an object with ``name`` and ``compare(a: str, b: str) -> float`` in [0, 1] (1 = the same
text). Built in (see ``docs/evaluation.md``):

* ``char3`` (default) — cosine similarity of the two texts' character-trigram count vectors, after
  lower-casing and collapsing whitespace (each text padded with one space on both ends, so word
  boundaries count). Robust to small edits, word order changes and inflections; cheap (linear in the
  text length). Two empty texts are identical (1.0); empty vs non-empty is 0.0.
* ``jaccard`` — |A ∩ B| / |A ∪ B| of the two texts' sets of lower-cased word tokens (``\\w+``).

A plug-in is named ``package.module:Class`` in the config (``similarity: {impl: …}``); the class is
constructed with no arguments and must provide ``compare`` (and may set ``name``).
"""

from __future__ import annotations

import importlib
import math
import re
from collections import Counter
from typing import Any, Protocol

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


class Similarity(Protocol):
    name: str

    def compare(self, a: str, b: str) -> float: ...


def _normalize(text: str) -> str:
    return _WS.sub(" ", text.lower()).strip()


def char_ngrams(text: str, n: int = 3) -> Counter[str]:
    """Counts of the character n-grams of `` <normalized text> ``; a text shorter than ``n`` is one gram."""
    t = _normalize(text)
    if not t:
        return Counter()
    padded = f" {t} "
    if len(padded) <= n:
        return Counter([padded])
    return Counter(padded[i:i + n] for i in range(len(padded) - n + 1))


def cosine(a: Counter[str], b: Counter[str]) -> float:
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    if len(a) > len(b):
        a, b = b, a
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return max(0.0, min(1.0, dot / (na * nb)))


class CharNgramCosine:
    """Cosine of character n-gram (default trigram) count vectors."""

    def __init__(self, n: int = 3):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.name = f"char{n}"

    def compare(self, a: str, b: str) -> float:
        return cosine(char_ngrams(a, self.n), char_ngrams(b, self.n))


class TokenJaccard:
    """Jaccard index of the sets of lower-cased word tokens."""

    name = "jaccard"

    def compare(self, a: str, b: str) -> float:
        sa, sb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
        if not sa and not sb:
            return 1.0
        return len(sa & sb) / len(sa | sb)


def load_plugin(spec: str) -> Any:
    """``package.module:Class`` → an instance (constructed with no arguments). Raises ImportError /
    AttributeError / TypeError with the spec named."""
    module_name, _, attr = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot load plug-in {spec!r}: {exc}") from None
    obj = cls()
    if not getattr(obj, "name", None):
        try:
            obj.name = spec
        except AttributeError:
            pass
    return obj


def make_similarity(spec: str | None) -> Similarity | None:
    """The configured similarity: ``None`` (off), ``char3``, ``jaccard`` or ``package.module:Class``."""
    if spec is None:
        return None
    if spec == "char3":
        return CharNgramCosine(3)
    if spec == "jaccard":
        return TokenJaccard()
    obj = load_plugin(spec)
    if not callable(getattr(obj, "compare", None)):
        raise TypeError(f"similarity plug-in {spec!r} has no compare(a, b) method")
    return obj


def safe_compare(sim: Similarity, a: str, b: str) -> float | None:
    """``sim.compare`` clamped to [0, 1]; None when it raises or returns a non-number / NaN."""
    try:
        v = float(sim.compare(a, b))
    except Exception:  # noqa: BLE001 - a plug-in must never stop the worker
        return None
    if not math.isfinite(v):
        return None
    return max(0.0, min(1.0, v))


__all__ = ["CharNgramCosine", "Similarity", "TokenJaccard", "char_ngrams", "cosine", "load_plugin",
           "make_similarity", "safe_compare"]
