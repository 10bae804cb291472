"""Pure helpers for evaluation: the prompt of a request body, the answer text of a response body, and
the body of a replay. No I/O; never raise on bad input (``None`` / ``""`` instead).

Shapes understood (see ``docs/evaluation.md``):

* OpenAI chat completions — answer ``choices[0].message.content`` (a string, or a list of content
  parts whose ``text`` are joined; ``message.refusal`` when there is no content); streamed
  (``text/event-stream``): the concatenated ``choices[0].delta.content``;
* OpenAI (legacy) completions — ``choices[0].text`` (streamed: concatenated);
* classifiers — ``label``, or the arg-max of ``probs`` (a mapping, or a list with ``labels``), or of a
  ``[{label, score}, …]`` list (possibly nested once);
* text generation (Hugging Face style) — ``generated_text`` (or ``[{generated_text}]``);
* ``text/plain`` — the text itself.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: prompts and answers longer than this are cut (evaluators see the head)
MAX_TEXT_CHARS = 100_000


def _decode(body: bytes) -> str | None:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parts_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        texts += [p for p in content if isinstance(p, str)]
        return "".join(texts)
    return None


def _argmax_label(pairs: list[tuple[Any, Any]]) -> str | None:
    best: tuple[str, float] | None = None
    for label, score in pairs:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            continue
        if best is None or score > best[1]:
            best = (str(label), float(score))
    return best[0] if best else None


def _from_json(obj: Any) -> str | None:
    if isinstance(obj, list):
        items = obj[0] if obj and isinstance(obj[0], list) else obj
        if items and all(isinstance(d, dict) for d in items):
            if "generated_text" in items[0] and isinstance(items[0]["generated_text"], str):
                return items[0]["generated_text"]
            return _argmax_label([(d.get("label"), d.get("score")) for d in items if "label" in d])
        return None
    if not isinstance(obj, dict):
        return None
    if "error" in obj and "choices" not in obj:
        return None
    choices = obj.get("choices")
    if isinstance(choices, list):
        if not choices or not isinstance(choices[0], dict):
            return None
        c0 = choices[0]
        msg = c0.get("message")
        if isinstance(msg, dict):
            text = _parts_text(msg.get("content"))
            if not text and isinstance(msg.get("refusal"), str):
                return msg["refusal"]
            return text if text is not None else ""
        if isinstance(c0.get("text"), str):
            return c0["text"]
        return None
    if isinstance(obj.get("generated_text"), str):
        return obj["generated_text"]
    if obj.get("label") is not None:
        return str(obj["label"])
    probs = obj.get("probs")
    if isinstance(probs, dict):
        return _argmax_label(list(probs.items()))
    if isinstance(probs, list):
        labels = obj.get("labels")
        names = labels if isinstance(labels, list) and len(labels) == len(probs) else list(range(len(probs)))
        return _argmax_label(list(zip(names, probs)))
    return None


def _from_sse(text: str) -> str | None:
    pieces: list[str] = []
    seen = False
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        c0 = choices[0]
        delta = c0.get("delta")
        if isinstance(delta, dict):
            seen = True
            piece = _parts_text(delta.get("content"))
            if piece:
                pieces.append(piece)
        elif isinstance(c0.get("text"), str):
            seen = True
            pieces.append(c0["text"])
    return "".join(pieces) if seen else None


def extract_text(body: bytes, content_type: str | None = None) -> str | None:
    """The answer text of a response body, or None when it carries none (an error body, an unknown
    shape, not UTF-8). An answer that is present but empty is ``""``."""
    text = _decode(body)
    if text is None:
        return None
    ct = (content_type or "").split(";")[0].strip().lower()
    stripped = text.lstrip()
    if ct == "text/event-stream" or stripped.startswith("data:"):
        out = _from_sse(text)
    elif ct.startswith("text/") and ct != "text/json":
        out = text
    else:
        try:
            out = _from_json(json.loads(text))
        except (ValueError, RecursionError):
            out = None
    return out[:MAX_TEXT_CHARS] if out is not None else None


def extract_prompt(body: bytes) -> str:
    """The prompt of a request body: the last ``user`` message of a chat request (all message texts
    when there is none), ``prompt`` of a completion (list items joined), ``input`` / ``inputs`` /
    ``text`` of other models; a non-JSON body is its own text. ``""`` when nothing is found."""
    text = _decode(body)
    if text is None:
        return ""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text[:MAX_TEXT_CHARS]
    out = ""
    if isinstance(obj, dict):
        messages = obj.get("messages")
        if isinstance(messages, list):
            msgs = [m for m in messages if isinstance(m, dict)]
            users = [m for m in msgs if m.get("role") == "user"]
            chosen = users[-1:] or msgs
            out = "\n".join(t for t in (_parts_text(m.get("content")) for m in chosen) if t)
        else:
            for key in ("prompt", "input", "inputs", "text"):
                v = obj.get(key)
                if isinstance(v, str):
                    out = v
                    break
                if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                    out = "\n".join(v)
                    break
    elif isinstance(obj, str):
        out = obj
    return out[:MAX_TEXT_CHARS]


def replay_body(body: bytes) -> tuple[bytes, bool]:
    """The body to replay: a JSON object with a ``stream`` field gets ``"stream": false`` (and loses
    ``stream_options``, which OpenAI-compatible servers reject without streaming), so the answer comes
    back as one JSON document. Returns (body, changed); any other body is replayed byte for byte."""
    text = _decode(body)
    if text is None or not text.lstrip().startswith("{"):
        return body, False
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return body, False
    if not isinstance(obj, dict) or "stream" not in obj:
        return body, False
    if obj.get("stream") is False and "stream_options" not in obj:
        return body, False
    obj["stream"] = False
    obj.pop("stream_options", None)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), True


__all__ = ["MAX_TEXT_CHARS", "extract_prompt", "extract_text", "replay_body"]
