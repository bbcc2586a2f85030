"""The errors a routed request can end in, one family so callers can catch them together.

``RoutingError`` is the base. ``IneligibleRequest`` (also a ``ValueError``) means no
expert may take the request as asked: a forced expert that is unknown, not allowed or
not able to (tools, structured output, ...), or nobody left after those checks.
``AllExpertsFailed`` (also a ``RuntimeError``) means every expert tried failed.
Adapters and the endpoint translate these into their own framework's errors or HTTP
statuses; they never decide eligibility themselves.
"""

from __future__ import annotations


class RoutingError(Exception):
    """A request could not be routed or answered; the message says why."""


class IneligibleRequest(RoutingError, ValueError):
    """No expert may take this request as asked (forced, allowed and able experts checked)."""


class AllExpertsFailed(RoutingError, RuntimeError):
    """Every expert tried for a request failed; ``failures`` maps each to its exception."""

    def __init__(self, failures: dict[str, BaseException]):
        self.failures = failures
        detail = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures.items())
        super().__init__(f"all {len(failures)} experts failed: {detail}")
