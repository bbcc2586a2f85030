"""Retrieval-augmented QA where ``TORouterLLM`` picks the expert LLM for each question.

A plain LlamaIndex query engine with its default templates: the retrieved context and
the question are filled into LlamaIndex's own QA (and, when the context needs several
calls, refine) prompts, and ``TORouterLLM`` routes every call on the question itself
(the template's ``query_str``), never on the context. Each answer is printed with the
expert that gave it and the text the router read.

Runs offline: documents are built in (or read from ``--docs DIR``), embeddings come from
the locally installed MiniLM, the router is a k-NN router trained on torouter's
synthetic routing data (or loaded with ``--router DIR``), and the four experts are the
deterministic offline LLMs from ``llamaindex_torouter.mock_llms``, named after
the synthetic experts. Swap in real LlamaIndex LLMs (same names) to use it for real.

    python examples/llamaindex_rag.py [--router runs/router] [--cost-weight 40] [question ...]
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core import Document, Settings, SimpleDirectoryReader, VectorStoreIndex  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402

from llamaindex_torouter import (  # noqa: E402
    RoutingDecisionEvent,
    RuleBasedMockFunctionCallingLLM,
    RuleBasedMockLLM,
    TORouterLLM,
)

DOCUMENTS = {
    "biomed.txt": (
        "Metformin lowers blood glucose mainly by reducing hepatic glucose production. "
        "Metformin is the usual first-line treatment for type 2 diabetes. "
        "Warfarin prevents clots by blocking vitamin K dependent clotting factors. "
        "Patients taking warfarin are monitored with the INR blood test."
    ),
    "geography.txt": (
        "Nairobi is the capital of Kenya. "
        "Lima is the capital of Peru and lies on the Pacific coast. "
        "Oslo is the capital of Norway. "
        "Swahili and English are the official languages of Kenya."
    ),
    "python.txt": (
        "In Python, slicing with a step of minus one reverses a string, as in text[::-1]. "
        "The built-in function sorted returns a new sorted list. "
        "A set removes duplicates but does not keep order; dict.fromkeys keeps order while removing duplicates."
    ),
    "arithmetic.txt": (
        "Average speed is the distance travelled divided by the time taken. "
        "A train that travels 120 km in 2 hours has an average speed of 60 km per hour. "
        "To find change, subtract the total price from the amount paid."
    ),
}

QUESTIONS = [
    "What is the mechanism of action of metformin?",
    "What is the capital of Kenya?",
    "How do I reverse a string in Python?",
    "A train travels 120 km in 2 hours. What is its average speed?",
]


class DecisionLog(BaseEventHandler):
    """Collects TORouterLLM routing decisions from LlamaIndex instrumentation."""

    decisions: list[RoutingDecisionEvent] = []

    @classmethod
    def class_name(cls) -> str:
        return "DecisionLog"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, RoutingDecisionEvent):
            self.decisions.append(event)


@dataclass
class Answer:
    question: str
    answer: str
    expert: str
    routed_text: str
    llm_calls: int
    scores: dict[str, float]


def load_documents(directory: str | None = None) -> list[Document]:
    if directory:
        return SimpleDirectoryReader(directory).load_data()
    return [Document(text=text, metadata={"file_name": name}) for name, text in DOCUMENTS.items()]


def train_router():
    """A small k-NN router trained on the synthetic routing data (a few seconds on CPU)."""
    from torouter import RoutingDataset, make_router
    from torouter.synthetic import make_synthetic

    return make_router("knn", k=5).fit(RoutingDataset(make_synthetic(120, seed=0)))


def local_experts() -> dict[str, Any]:
    """Offline stand-ins for the synthetic experts; the two larger ones can call tools."""
    return {
        "edge-small": RuleBasedMockLLM(name="edge-small", context_window=2048),
        "code-7b": RuleBasedMockFunctionCallingLLM(name="code-7b", context_window=8192),
        "med-7b": RuleBasedMockLLM(name="med-7b", context_window=8192),
        "cloud-large": RuleBasedMockFunctionCallingLLM(name="cloud-large", context_window=32768),
    }


def local_embeddings():
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from torouter.encoders import resolve_model

    return HuggingFaceEmbedding(model_name=resolve_model("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")


def build_query_engine(llm: TORouterLLM, documents: list[Document], embed_model, top_k: int = 2):
    """LlamaIndex's default query engine: default QA and refine templates, compact response mode."""
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)
    return index.as_query_engine(llm=llm, similarity_top_k=top_k)


def run(llm: TORouterLLM, embed_model, questions: list[str], docs_dir: str | None = None) -> list[Answer]:
    """Answer ``questions`` over the documents; each answer says which expert gave it and what was routed on."""
    engine = build_query_engine(llm, load_documents(docs_dir), embed_model)
    log = DecisionLog()
    root = get_dispatcher()
    root.add_event_handler(log)
    answers = []
    try:
        for question in questions:
            log.decisions.clear()
            response = engine.query(question)
            decision = log.decisions[-1]
            answers.append(Answer(question, str(response), decision.expert, decision.routed_text,
                                  len(log.decisions), decision.scores))
    finally:
        root.event_handlers.remove(log)
    return answers


def main(argv: list[str] | None = None) -> list[Answer]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", help="a saved router directory (default: train a k-NN router on synthetic data)")
    parser.add_argument("--docs", help="a directory of documents (default: built-in sample documents)")
    parser.add_argument("--cost-weight", type=float, default=40.0, help="quality given up per $ of expert cost")
    parser.add_argument("questions", nargs="*", help="questions to ask (default: one per domain)")
    args = parser.parse_args(argv)

    llm = TORouterLLM(local_experts(), args.router or train_router(), cost_weight=args.cost_weight)
    embed_model = local_embeddings()
    # The engine gets both explicitly; setting them globally too keeps any component
    # that falls back to Settings offline instead of reaching for OpenAI.
    Settings.llm, Settings.embed_model = llm, embed_model
    answers = run(llm, embed_model, args.questions or QUESTIONS, args.docs)
    for a in answers:
        calls = f"{a.llm_calls} LLM calls" if a.llm_calls > 1 else "1 LLM call"
        print(f"Q: {a.question}\n   -> {a.expert} ({calls}, routed on {a.routed_text!r}): {a.answer}")
    print(f"router inference runs: {llm.controller.router_calls}, answered from the cache: "
          f"{llm.controller.cache_hits}")
    return answers


if __name__ == "__main__":
    main()
