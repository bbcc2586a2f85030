"""A LangChain ``create_agent`` tool-calling agent whose model calls a trained router routes.

The same experts and router, two ways:

1. ``TORouterMiddleware``: the router picks the expert at the run's first model call,
   among the experts that can call the agent's tools, and that expert finishes the run
   (tool calls, then the answer). The decision is in the agent state
   (``result["torouter"]``) and on each AI message. A run can change the trade-off
   through the runtime context: ``agent.invoke(..., context={"cost_weight": 0})``.
2. ``ChatTORouter`` as the agent's model: every model call is routed on its own.

The experts are offline ``RuleBasedFakeChatModel`` models named after the synthetic experts;
``edge-small`` emulates a model without tool calling, so it never answers here. Runs
offline in seconds.

    python examples/langchain_agent.py [--router runs/router] [--cost-weight 50]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain.agents import create_agent  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage  # noqa: E402
from langchain_core.tools import BaseTool, tool  # noqa: E402

from langchain_torouter import ChatTORouter, RuleBasedFakeChatModel, TORouterMiddleware  # noqa: E402
from torouter import RoutingDataset, Router, load_router, make_router  # noqa: E402
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
SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when useful."

QUESTIONS = [
    "Use the drug_interactions tool: what interacts with 'warfarin'?",
    "Use the multiply tool to compute 12 times 7.",
]


def build_experts() -> dict[str, RuleBasedFakeChatModel]:
    """One local expert per synthetic expert; ``edge-small`` cannot call tools."""
    return {name: RuleBasedFakeChatModel(model=name, tool_calling=name != "edge-small") for name in EXPERTS}


def build_router(path: str | None = None) -> Router:
    """A saved router, or a k-NN router trained on the synthetic routing data (a few seconds)."""
    if path:
        return load_router(path)
    return make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240)))


def middleware_agent(experts: dict[str, RuleBasedFakeChatModel], router: Router, cost_weight: float):
    """``create_agent`` with ``TORouterMiddleware``: the model given here is replaced on every call."""
    routing = TORouterMiddleware(experts=experts, router=router, cost_weight=cost_weight)
    return create_agent(experts["cloud-large"], tools=TOOLS, system_prompt=SYSTEM_PROMPT, middleware=[routing])


def chat_model_agent(experts: dict[str, RuleBasedFakeChatModel], router: Router, cost_weight: float):
    """``create_agent`` with ``ChatTORouter`` as its model: each model call is routed."""
    llm = ChatTORouter(experts=experts, router=router, cost_weight=cost_weight)
    return create_agent(llm, tools=TOOLS, system_prompt=SYSTEM_PROMPT)


def answered_by(message: AIMessage) -> str:
    return message.response_metadata["torouter"]["expert"]


def show(question: str, messages: list[BaseMessage], note: str = "") -> None:
    print(f"Q: {question}{note}")
    for message in messages:
        if isinstance(message, AIMessage):
            what = f"calls {[c['name'] for c in message.tool_calls]}" if message.tool_calls else message.content
            print(f"   {answered_by(message)}: {what}")
        elif isinstance(message, ToolMessage):
            print(f"   tool {message.name}: {message.content}")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", help="a saved router directory (default: train one on synthetic data)")
    parser.add_argument("--cost-weight", type=float, default=50.0)
    args = parser.parse_args(argv)

    experts, router = build_experts(), build_router(args.router)
    results: dict[str, list[dict]] = {"middleware": [], "chat_model": []}

    print("== create_agent + TORouterMiddleware (one decision per run) ==")
    agent = middleware_agent(experts, router, args.cost_weight)
    runs = [(q, None) for q in QUESTIONS] + [(QUESTIONS[0], {"cost_weight": 0.0})]
    for question, context in runs:
        state = agent.invoke({"messages": [{"role": "user", "content": question}]}, context=context)
        note = f"   [context={context}]" if context else ""
        show(question, state["messages"][1:], note)
        results["middleware"].append({"question": question, "context": context, "messages": state["messages"],
                                      "decision": state["torouter"]})

    print("== create_agent + ChatTORouter as the model (each call routed) ==")
    agent = chat_model_agent(experts, router, args.cost_weight)
    for question in QUESTIONS:
        state = agent.invoke({"messages": [{"role": "user", "content": question}]})
        show(question, state["messages"][1:])
        results["chat_model"].append({"question": question, "messages": state["messages"]})
    return results


if __name__ == "__main__":
    main()
