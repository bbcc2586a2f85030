"""A tool-calling agent whose model is ``ChatTORouter``.

The agent loop is the usual one: the model either calls tools, whose results go
back into the conversation, or answers. ``bind_tools`` binds the tools on every
expert that can call tools and routes only among those: here ``edge-small`` cannot,
so it never gets an agent turn. Runs offline with local ``ChatRuleBased`` experts;
with ``langchain>=1`` installed, ``langchain.agents.create_agent(model=llm, tools=TOOLS)``
takes the same ``ChatTORouter``.

    python examples/langchain_agent.py [--router runs/router] [--cost-weight 50]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.runnables import Runnable  # noqa: E402
from langchain_core.tools import BaseTool, tool  # noqa: E402

from langchain_torouter import ChatRuleBased, ChatTORouter  # noqa: E402
from torouter import RoutingDataset, load_router, make_router  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402

_INTERACTIONS = {
    "warfarin": "aspirin, ibuprofen and amoxicillin raise the bleeding risk",
    "metformin": "iodinated contrast agents raise the risk of lactic acidosis",
    "lisinopril": "potassium supplements raise the risk of hyperkalemia",
}


@tool
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


@tool
def drug_interactions(drug: str) -> str:
    """Look up the known interactions of a drug."""
    return _INTERACTIONS.get(drug.lower(), f"no interactions on file for {drug}")


TOOLS: list[BaseTool] = [multiply, drug_interactions]

QUESTIONS = [
    "Use the drug_interactions tool: what interacts with 'warfarin'?",
    "Use the multiply tool to compute 12 times 7.",
]


def build_llm(router=None, cost_weight: float = 50.0) -> ChatTORouter:
    """``ChatTORouter`` over local experts; ``edge-small`` emulates a model without tool calling."""
    experts = {name: ChatRuleBased(model=name, tool_calling=name != "edge-small") for name in EXPERTS}
    if router is None:
        router = make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240)))
    return ChatTORouter(experts=experts, router=router, cost_weight=cost_weight)


def run_agent(llm_with_tools: Runnable, question: str, tools: list[BaseTool] = TOOLS,
              max_steps: int = 5) -> list[BaseMessage]:
    """Call the model, run the tools it asks for, repeat until it answers; returns the conversation."""
    by_name = {t.name: t for t in tools}
    messages: list[BaseMessage] = [SystemMessage("You are a helpful assistant. Use the tools when useful."),
                                   HumanMessage(question)]
    for _ in range(max_steps):
        reply = llm_with_tools.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            messages.append(by_name[call["name"]].invoke(call))
    raise RuntimeError(f"the agent did not answer within {max_steps} steps")


def main(argv: list[str] | None = None) -> list[list[BaseMessage]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", help="a saved router directory (default: train one on synthetic data)")
    parser.add_argument("--cost-weight", type=float, default=50.0)
    args = parser.parse_args(argv)

    llm = build_llm(load_router(args.router) if args.router else None, args.cost_weight)
    agent_model = llm.bind_tools(TOOLS)
    conversations = []
    for question in QUESTIONS:
        conversation = run_agent(agent_model, question)
        conversations.append(conversation)
        print(f"Q: {question}")
        for message in conversation[2:]:
            if isinstance(message, AIMessage):
                routed = message.response_metadata["torouter"]
                what = f"calls {[c['name'] for c in message.tool_calls]}" if message.tool_calls else message.content
                print(f"   {routed['expert']} (of {routed['ranking']}): {what}")
            else:
                print(f"   tool {message.name}: {message.content}")
    return conversations


if __name__ == "__main__":
    main()
