"""Evaluate: response-quality signals computed by the controller itself: the sampler that pairs
baseline and canary answers, evaluators (refusal, LLM judge, plug-ins), similarity and text extraction."""
