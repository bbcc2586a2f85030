"""torouter: route each LLM query to the expert that answers it best for its price.

An implementation of the TensorOpera Router (arXiv 2408.12320): routers trained on
soft labels ``softmax(T * score)`` read only the prompt and predict every expert's
quality; a cost-aware policy picks the expert at routing time.
"""

from .controller import Controller
from .errors import AllExpertsFailed, IneligibleRequest, RoutingError
from .data import DataError, Record, RoutingDataset, iter_jsonl, prompt_text, write_jsonl
from .encoders import DEFAULT_ENCODER, Encoder
from .labels import DEFAULT_TEMPERATURE, soft_labels
from .policy import Decision, choose, rank
from .routers import ROUTERS, Router, RouterFileError, load_router, make_router
from .routing_text import ROUTE_ON, routing_text

__version__ = "0.1.0"

__all__ = [
    "AllExpertsFailed", "Controller", "DataError", "Decision", "DEFAULT_ENCODER", "DEFAULT_TEMPERATURE",
    "IneligibleRequest", "RoutingError",
    "Encoder", "Record", "ROUTE_ON", "ROUTERS", "Router", "RouterFileError", "RoutingDataset", "choose",
    "iter_jsonl", "load_router", "make_router", "prompt_text", "rank", "routing_text", "soft_labels", "write_jsonl",
]
