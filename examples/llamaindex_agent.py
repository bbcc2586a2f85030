"""A LlamaIndex ``FunctionAgent`` whose LLM is ``TORouterLLM``.

The agent calls tools until it can answer. ``TORouterLLM`` routes every step of a run on
the user's request (tool results are never read), so all steps of one request go to
the same expert for one router call: later steps are answered from the prediction
cache. Tool calls route only among the experts that support function calling: here
``edge-small`` and ``med-7b`` do not, so they never get an agent step. The routing
decision travels on each step's ``AgentOutput`` (``response.additional_kwargs["torouter"]``),
which is what this example prints.

Runs offline: the router is a k-NN router trained here on torouter's synthetic routing
data (or loaded with ``--router DIR``), and the experts are the deterministic offline LLMs
of ``llamaindex_torouter.mock_llms``, named after the synthetic experts.

    python examples/llamaindex_agent.py [--router runs/router] [--cost-weight 40]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from llamaindex_torouter import RuleBasedMockFunctionCallingLLM, RuleBasedMockLLM, TORouterLLM  # noqa: E402
from torouter import RoutingDataset, load_router, make_router  # noqa: E402
from torouter.synthetic import make_synthetic  # noqa: E402

_INTERACTIONS = {
    "warfarin": "aspirin, ibuprofen and amoxicillin raise the bleeding risk",
    "metformin": "iodinated contrast agents raise the risk of lactic acidosis",
    "lisinopril": "potassium supplements raise the risk of hyperkalemia",
}


def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


def drug_interactions(drug: str) -> str:
    """Look up the known interactions of a drug."""
    for name, interactions in _INTERACTIONS.items():
        if name in drug.lower():
            return f"{name}: {interactions}"
    return f"no interactions on file for {drug}"


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(drug_interactions)]

QUESTIONS = [
    "What does warfarin interact with? Use the drug interactions lookup.",
    "What is 12 multiplied by 7?",
    "Write a Python function that multiplies 6 by 9.",
]


@dataclass
class Step:
    expert: str
    ranking: list[str]
    tool_calls: list[str]
    text: str


@dataclass
class Run:
    question: str
    answer: str
    steps: list[Step] = field(default_factory=list)
    tool_results: list[tuple[str, str]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # steps and tool results, in order


def local_experts() -> dict[str, Any]:
    """Offline stand-ins for the synthetic experts; code-7b and cloud-large can call tools."""
    return {
        "edge-small": RuleBasedMockLLM(name="edge-small", context_window=2048),
        "code-7b": RuleBasedMockFunctionCallingLLM(name="code-7b", context_window=8192),
        "med-7b": RuleBasedMockLLM(name="med-7b", context_window=8192),
        "cloud-large": RuleBasedMockFunctionCallingLLM(name="cloud-large", context_window=32768),
    }


def build_llm(router=None, cost_weight: float = 40.0) -> TORouterLLM:
    """``TORouterLLM`` over the local experts; without ``router``, a k-NN router trained on synthetic data."""
    if router is None:
        router = make_router("knn", k=5).fit(RoutingDataset(make_synthetic(240, seed=0)))
    return TORouterLLM(local_experts(), router, cost_weight=cost_weight)


async def ask(agent: FunctionAgent, question: str) -> Run:
    """Run the agent on ``question``, recording each step's routing decision and each tool result."""
    handler = agent.run(question)
    run = Run(question, "")
    async for event in handler.stream_events():
        if isinstance(event, AgentOutput):
            routed = event.response.additional_kwargs["torouter"]
            step = Step(routed["expert"], routed["ranking"], [c.tool_name for c in event.tool_calls],
                        event.response.content or "")
            run.steps.append(step)
            run.log.append(f"{step.expert} (of {step.ranking}): "
                           + (f"calls {step.tool_calls}" if step.tool_calls and not step.text else step.text))
        elif isinstance(event, ToolCallResult):
            run.tool_results.append((event.tool_name, str(event.tool_output.content)))
            run.log.append(f"tool {event.tool_name}: {event.tool_output.content}")
    run.answer = str(await handler)
    return run


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--router", help="a saved router directory (default: train one on synthetic data)")
    parser.add_argument("--cost-weight", type=float, default=40.0, help="quality given up per $ of expert cost")
    args = parser.parse_args(argv)

    llm = build_llm(load_router(args.router) if args.router else None, args.cost_weight)
    agent = FunctionAgent(tools=TOOLS, llm=llm, system_prompt="You are a helpful assistant. Use the tools.")
    runs = []
    for question in QUESTIONS:
        before = llm.controller.router_calls
        run = asyncio.run(ask(agent, question))
        runs.append(run)
        print(f"Q: {question}")
        for line in run.log:
            print(f"   {line}")
        print(f"   {len(run.steps)} steps, {llm.controller.router_calls - before} router inference run")
    return runs


if __name__ == "__main__":
    main()
