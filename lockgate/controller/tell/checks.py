"""The HTTP adapter of the rollout steps' external checks (the ``CheckCaller`` port of
:mod:`lockgate.controller.ports`; ``app.py`` gives it to the promoter).

One request per call on the tell part's asyncio HTTP client (:func:`.alerts.delivery.http_request`:
no threads, ``Connection: close``, credentials in the URL as basic auth, no proxies), cut off after the
check's ``timeout_s``. It never raises: a timeout, a refused connection or a non-HTTP answer comes back
as a :class:`~lockgate.controller.ports.CheckAnswer` without a status, which holds the rollout
(:func:`lockgate.controller.decide.gates.judge_answer` says why).
"""

from __future__ import annotations

import asyncio
import time

from lockgate.controller.ports import CheckAnswer
from lockgate.controller.tell.alerts.delivery import DeliveryError, http_request

#: bytes of a check's answer kept (enough for the JSON field it is judged on, and the excerpt shown)
MAX_ANSWER_BYTES = 64 * 1024

__all__ = ["HttpCheckCaller", "MAX_ANSWER_BYTES"]


class HttpCheckCaller:
    """Calls external checks over HTTP(S) (see the module docstring)."""

    async def call(self, method: str, url: str, *, body: bytes | None, timeout_s: float) -> CheckAnswer:
        t0 = time.monotonic()

        def ms() -> float:
            return (time.monotonic() - t0) * 1000.0

        try:
            # the client's own timeout is a backstop; the check's timeout is this wait_for
            r = await asyncio.wait_for(http_request(method, url, body, timeout=timeout_s + 1.0), timeout_s)
        except asyncio.TimeoutError:
            return CheckAnswer(None, elapsed_ms=ms(), error=f"no answer within {timeout_s:g} s", timed_out=True)
        except DeliveryError as exc:
            return CheckAnswer(None, elapsed_ms=ms(), error=str(exc))
        except Exception as exc:  # never raise into the promotion loop: an odd failure holds like the others
            return CheckAnswer(None, elapsed_ms=ms(), error=f"{type(exc).__name__}: {exc}")
        return CheckAnswer(r.status, r.body[:MAX_ANSWER_BYTES], ms())
