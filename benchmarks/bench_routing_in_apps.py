"""Routing inside RAG chains and agents: does the router read the question, and how often does it run?

Prints, side by side in one run:

* **RAG agreement**: the shipped demo prompts wrapped in the frameworks' RAG templates
  (LlamaIndex's default text-QA and chat-QA templates, two common LangChain RAG prompts)
  with 300-600 words of unrelated context. For each, the share of prompts whose routed
  expert equals the expert chosen on the bare question, reading the whole user message
  (the former behaviour, ``prompt_text(..., "last_user")``) and reading what
  ``torouter.routing_text`` picks now. Target: >= 95% now.
* **Agent routing cost**: ``create_agent`` runs over ``ChatTORouter`` with tool-calling
  questions: model calls and router passes per run, routing every call afresh
  (``sticky=False``, the former behaviour) and with sticky routing (the default).

The router is a k-NN router over MiniLM embeddings trained on the synthetic four-expert
data (``edge-small``, ``code-7b``, ``med-7b``, ``cloud-large``), whose choice follows the
question's domain, so the demo prompts (math, code, knowledge, biomedical) spread over it.

    python benchmarks/bench_routing_in_apps.py [--cost-weight 50] [--agent-runs 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT  # noqa: E402
from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT  # noqa: E402

from torouter import Controller, RoutingDataset, make_router  # noqa: E402
from torouter.data import content_text, prompt_text  # noqa: E402
from torouter.prepare import demo_prompts  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402

# Unrelated filler: municipal, geographic and historical prose, none of it about the questions.
FILLER = [
    "The town council met on Tuesday to discuss the resurfacing of the main road.",
    "Annual rainfall in the valley averages around eight hundred millimetres.",
    "The old railway station was converted into a museum in the late nineteen-nineties.",
    "Local farmers grow barley, potatoes and a small amount of rapeseed.",
    "The river is crossed by three bridges, the oldest of which dates from 1742.",
    "A weekly market is held in the square on Saturday mornings.",
    "The library extended its opening hours after a public consultation.",
    "Tourism increased steadily after the cycling route along the canal opened.",
    "The parish church has a bell tower that was rebuilt after a storm.",
    "School enrolment has remained stable for the past decade.",
    "The regional bus company added two evening services on weekdays.",
    "Several listed buildings line the street leading to the harbour.",
]

LANGCHAIN_RAG = "Answer the question based only on the following context:\n{context}\n\nQuestion: {question}"
LANGCHAIN_HUB_RAG = ("You are an assistant for question-answering tasks. Use the following pieces of retrieved "
                     "context to answer the question. If you don't know the answer, just say that you don't know. "
                     "Use three sentences maximum and keep the answer concise.\nQuestion: {question}\n"
                     "Context: {context}\nAnswer:")

# A prompt with no recognisable question marker: only ``route_on_input`` (naming the key) helps here.
CUSTOM_RAG = "{context}\n\nWith the notes above in mind: {question}"


def context(rng: random.Random) -> str:
    """300-600 words of unrelated prose."""
    target, words = rng.randint(300, 600), []
    while len(words) < target:
        words.extend(rng.choice(FILLER).split())
    return " ".join(words[:target])


def templates() -> dict[str, callable]:
    """Each template as ``fill(question, context) -> core prompt`` (messages as the router sees them)."""
    def llamaindex_text(q, c):
        return [{"role": "user", "content": DEFAULT_TEXT_QA_PROMPT.format(context_str=c, query_str=q)}]

    def llamaindex_chat(q, c):
        return [{"role": m.role.value, "content": m.content}
                for m in CHAT_TEXT_QA_PROMPT.format_messages(context_str=c, query_str=q)]

    def langchain(template):
        prompt = ChatPromptTemplate.from_messages([("human", template)])
        return lambda q, c: [{"role": "user", "content": m.content}
                             for m in prompt.format_messages(question=q, context=c)]

    return {"LlamaIndex text QA (default)": llamaindex_text, "LlamaIndex chat QA (default)": llamaindex_chat,
            "LangChain 'based only on the context'": langchain(LANGCHAIN_RAG),
            "LangChain hub rag-prompt": langchain(LANGCHAIN_HUB_RAG),
            "custom, no markers (context first)": langchain(CUSTOM_RAG)}


def question(row) -> str:
    return row["prompt"] if isinstance(row["prompt"], str) else content_text(row["prompt"][-1]["content"])


def rag_agreement(router, cost_weight: float) -> None:
    controller = Controller(router, cost_weight=cost_weight, cache_size=0)
    # The former behaviour: the whole latest user message, as filled by the template.
    former = Controller(router, cost_weight=cost_weight, cache_size=0,
                        route_on=lambda prompt: prompt_text(prompt, "last_user"))
    rng = random.Random(0)
    questions = [question(row) for row in demo_prompts()]
    bare = [d.expert for d in controller.decide_many(questions)]
    print(f"RAG agreement: routed expert == expert chosen on the bare question "
          f"({len(questions)} demo prompts, 300-600 words of context, cost_weight={cost_weight})")
    print(f"  {'template':40s} {'before':>8s} {'now':>8s} {'route_on_input':>15s}")
    for name, fill in templates().items():
        prompts = [fill(q, context(rng)) for q in questions]
        before = [d.expert for d in former.decide_many(prompts)]
        now = [d.expert for d in controller.decide_many(prompts)]
        # ``route_on_input(chain, "question")`` routes on the chain's input key: the bare question.
        named = [d.expert for d in controller.decide_many(questions)]
        share = lambda got: sum(a == b for a, b in zip(got, bare)) / len(bare)  # noqa: E731
        print(f"  {name:40s} {share(before):8.1%} {share(now):8.1%} {share(named):15.1%}")
    print(f"  bare-question picks: { {e: bare.count(e) for e in sorted(set(bare))} }")


def counting(router):
    clone = copy.copy(router)
    clone.calls = 0
    predict = router.predict

    def counted(texts):
        clone.calls += 1
        return predict(texts)

    clone.predict = counted
    return clone


def agent_cost(router, cost_weight: float, runs: int) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from langchain_torouter import RuleBasedFakeChatModel, ChatTORouter

    @tool
    def multiply(a: float, b: float) -> float:
        """Multiply two numbers."""
        return a * b

    @tool
    def drug_interactions(drug: str) -> str:
        """Look up the known interactions of a drug."""
        return f"no interactions on file for {drug}"

    asks = ["Use the multiply tool to compute {a} times {b}.",
            "Use the drug_interactions tool: what interacts with 'warfarin'? Case {a}-{b}."]
    print(f"\nAgent routing cost: create_agent over ChatTORouter, {runs} runs with tool calls")
    print(f"  {'routing':28s} {'model calls/run':>16s} {'router passes/run':>18s} {'ms/run':>8s}")
    for label, sticky in (("every call (sticky=False)", False), ("sticky (default)", True)):
        counted = counting(router)
        experts = {name: RuleBasedFakeChatModel(model=name, tool_calling=name != "edge-small") for name in EXPERTS}
        llm = ChatTORouter(experts=experts, router=counted, cost_weight=cost_weight, sticky=sticky)
        agent = create_agent(llm, tools=[multiply, drug_interactions])
        calls, start = 0, time.perf_counter()
        for i in range(runs):
            text = asks[i % len(asks)].format(a=i + 2, b=i + 7)
            messages = agent.invoke({"messages": [HumanMessage(text)]})["messages"]
            calls += sum(m.type == "ai" for m in messages)
        elapsed = (time.perf_counter() - start) * 1000 / runs
        print(f"  {label:28s} {calls / runs:16.2f} {counted.calls / runs:18.2f} {elapsed:8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-weight", type=float, default=50.0)
    parser.add_argument("--agent-runs", type=int, default=8)
    args = parser.parse_args(argv)
    router = make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240)))
    rag_agreement(router, args.cost_weight)
    agent_cost(router, args.cost_weight, args.agent_runs)


if __name__ == "__main__":
    main()
