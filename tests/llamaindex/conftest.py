"""Fixtures for the LlamaIndex adapter's tests."""

import pytest
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

from llamaindex_torouter import RoutingDecisionEvent
from torouter import RoutingDataset, make_router
from torouter.synthetic import make_synthetic


@pytest.fixture(scope="module")
def router():
    """A k-NN router over the four simulated experts (edge-small, code-7b, med-7b, cloud-large)."""
    return make_router("knn", k=5).fit(RoutingDataset(make_synthetic(120, seed=0)))


class Decisions(BaseEventHandler):
    """Collects every ``RoutingDecisionEvent`` the root dispatcher sees."""

    seen: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Decisions"

    def handle(self, event, **kwargs):
        if isinstance(event, RoutingDecisionEvent):
            self.seen.append(event)


@pytest.fixture
def decisions():
    """The routing decisions emitted while the test runs, in order."""
    handler = Decisions()
    handler.seen.clear()
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler.seen
    root.event_handlers.remove(handler)
