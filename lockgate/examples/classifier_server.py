"""Example text-classifier model server (FastAPI on uvicorn).

    python -m lockgate.examples.classifier_server --port 18101 --version v1 [flags]

Endpoints:
  POST /v1/classify, POST /predict   body {"text": "...", "true_class"?: "..."}
  GET  /healthz

Response: {"id", "label", "score", "probs": {class: p, ...}, "model": "<model>-<version>"}
plus header ``x-model-version``.

Right/wrong answers: the true class is taken from the ``x-true-class`` request
header (the demo traffic generator knows it and later posts it as delayed
feedback) or else the body's ``true_class``.  With a known true class the
server answers it with probability ``accuracy[class]``, otherwise a uniformly
chosen different class.  Without one it predicts a class drawn from the prior
(--class-weights, uniform by default).  The predicted class's probability is
~U(0.6, 0.99) when right and ~U(0.5, 0.85) when wrong (so confidence is
informative), the remainder spread randomly over the other classes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from fastapi import FastAPI, Request
from starlette.responses import Response

from ._server import (ALL_METHODS, HTTPError, RngSource, add_common_args, error_response, json_response,
                      lognormal_ms, new_app, new_id, parse_class_floats, read_json, run_server)
from ._testmodes import test_mode_response

PATHS = ("/v1/classify", "/predict")
DEFAULT_CLASSES = "billing,technical,account,fraud"


class ClassifierServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if len(self.classes) < 2:
            raise SystemExit("--classes needs at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise SystemExit("--classes has duplicates")
        self.accuracy = parse_class_floats(args.accuracy, self.classes, 0.9, "--accuracy")
        w = parse_class_floats(args.class_weights, self.classes, 1.0, "--class-weights")
        tot = sum(w.values())
        if tot <= 0:
            raise SystemExit("--class-weights must not all be zero")
        self.prior = [w[c] / tot for c in self.classes]
        self.rngs = RngSource(args.seed)
        self.model = f"{args.model_name}-{args.version}"

    def app(self) -> FastAPI:
        """The routes: ``POST /v1/classify`` and ``POST /predict``, ``/healthz`` (any method); anything
        else is an OpenAI-style 404."""
        app = new_app("lockgate example classifier model")

        @app.api_route("/healthz", methods=ALL_METHODS)
        async def healthz() -> Response:
            return json_response({"status": "ok", "version": self.args.version})

        async def classify(request: Request) -> Response:
            if self.args.test_modes and "x-test-mode" in request.headers:
                return test_mode_response(request, self.model)
            return await self._classify(request)

        for path in PATHS:
            app.add_api_route(path, classify, methods=["POST"])
        return app

    async def _classify(self, req: Request) -> Response:
        a = self.args
        body = await read_json(req)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise HTTPError(400, "body must be a JSON object with a string 'text'")
        true_cls = req.headers.get("x-true-class") or body.get("true_class")
        if true_cls not in self.classes:
            true_cls = None

        rng = self.rngs.for_request(req.headers)
        u_err, u_acc = rng.random(), rng.random()
        latency_ms = lognormal_ms(rng, a.latency_ms, a.latency_jitter_ms)
        await asyncio.sleep(latency_ms / 1000.0)
        if u_err < a.error_rate:
            return error_response(500, "The server had an error while processing your request.",
                                  "server_error", "internal_error")

        classes = self.classes
        if true_cls is not None:
            if u_acc < self.accuracy[true_cls]:
                label, correct = true_cls, True
            else:
                label, correct = rng.choice([c for c in classes if c != true_cls]), False
        else:
            label = rng.choices(classes, weights=self.prior)[0]
            correct = True  # unknown; behave like a confident model
        score = rng.uniform(0.6, 0.99) if correct else rng.uniform(0.5, 0.85)
        others = [c for c in classes if c != label]
        raw = [rng.random() + 0.05 for _ in others]
        tot = sum(raw)
        probs = {c: 0.0 for c in classes}
        probs[label] = round(score, 4)
        rest = 1.0 - probs[label]
        for c, r in zip(others, raw):
            probs[c] = round(rest * r / tot, 4)
        # fix rounding so the probabilities sum to 1 exactly-ish
        probs[others[-1]] = round(max(0.0, 1.0 - sum(v for c, v in probs.items() if c != others[-1])), 4)
        return json_response({
            "id": new_id("cls-"),
            "label": label,
            "score": probs[label],
            "probs": probs,
            "model": self.model,
        })


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lockgate.examples.classifier_server",
                                description="Example text-classifier model server.")
    add_common_args(p, default_model="intent-classifier")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help=f"comma-separated classes (default {DEFAULT_CLASSES})")
    p.add_argument("--class-weights", default=None,
                   help="traffic prior, e.g. billing=0.4,technical=0.3,... (used when no true class is given; "
                        "also read by the demo traffic generator)")
    p.add_argument("--accuracy", default=None,
                   help="per-class accuracy, e.g. billing=0.92,technical=0.9,account=0.9,fraud=0.85, "
                        "or one number for all (default 0.9)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(ClassifierServer(args).app(), args)


if __name__ == "__main__":
    sys.exit(main())
