"""``TORouterDecisionModel``: a trained router as a LangChain decision model.

It answers ``Choice`` questions over a router's experts, so a trained router can drive
LangChain's own ``ModelRouterMiddleware``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.decisions import BaseDecisionModel, Choice, ChoiceAnswer, ClassifierResponse, Question
from langchain_core.messages import BaseMessage
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from torouter.controller import Controller
from torouter.labels import DEFAULT_TEMPERATURE
from torouter.policy import Decision
from torouter.routers import Router

from ._routing import check_router, messages_to_prompt


class TORouterDecisionModel(BaseDecisionModel):
    """A trained TO-Router as a LangChain decision model: answers ``Choice`` questions over its experts.

    The labels of each ``Choice`` (its ``criteria`` keys) must be expert names of the
    router; the router reads the state (a string, a message, a message list, or a dict
    with ``"messages"``) and the cost-aware policy picks among those labels. Criteria
    descriptions and instructions are not read: the router has learnt from data which
    expert answers which prompts well. ``probabilities`` are ``softmax(temperature *
    (quality - cost_weight * cost))`` over the labels within ``max_cost`` (0 for the
    others; ``temperature`` defaults to the router's soft-label temperature), so the
    choice has the highest probability; ``confidence`` is the choice's probability.

    With ``ModelRouterMiddleware`` (which routes once per run on the latest human message):

    ```python
    from langchain.agents.middleware import ModelChoice, ModelRouterMiddleware

    ModelRouterMiddleware(
        choices={name: ModelChoice(model=chat_model, criteria=name) for name, chat_model in experts.items()},
        instructions="Pick the expert with the best quality for its price.",
        classifier=TORouterDecisionModel(router="runs/router", cost_weight=50.0),
    )
    ```

    ``TORouterMiddleware`` does more for agents (tool and structured-output eligibility,
    per-run options from the runtime context, fallbacks along the ranking).
    """

    model: str = "torouter"
    """Name reported to tracing as the decision model."""

    router: Router | str | Path = Field(exclude=True)
    """A fitted ``torouter`` router, or the directory it was saved to."""

    cost_weight: float = Field(default=0.0, ge=0.0)
    max_cost: float | None = Field(default=None, ge=0.0)
    route_on: Any = "last_user"
    """The text the router reads: a ``torouter.ROUTE_ON`` mode or a callable."""
    prices: dict[str, float] | None = None
    temperature: float | None = Field(default=None, gt=0.0)
    """Sharpness of ``probabilities``; None uses the router's soft-label temperature."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    _controller: Controller = PrivateAttr()

    @field_validator("router", mode="before")
    @classmethod
    def _check_router(cls, router: Any) -> Any:
        return check_router(router)

    @model_validator(mode="after")
    def _build_controller(self) -> TORouterDecisionModel:
        self._controller = Controller(self.router, self.cost_weight, self.max_cost, self.route_on, self.prices)
        return self

    @property
    def controller(self) -> Controller:
        return self._controller

    @property
    def _provider(self) -> str:
        return "torouter"

    def _classify(self, state: Any, questions: dict[str, Question]) -> ClassifierResponse:
        prompt = _state_prompt(state)
        answers = {}
        for key, question in questions.items():
            if not isinstance(question, Choice):
                raise ValueError(f"TORouterDecisionModel answers Choice questions over its experts only; "
                                 f"question {key!r} is a {type(question).__name__}")
            labels = list(question.criteria)
            unknown = [label for label in labels if label not in self._controller.experts]
            if unknown:
                raise ValueError(f"question {key!r}: labels {unknown} are not experts of the router "
                                 f"{self._controller.experts}")
            answers[key] = self._answer(self._controller.decide(prompt, allowed=labels), labels)
        return ClassifierResponse(model=self.model, answers=answers)

    def _answer(self, decision: Decision, labels: list[str]) -> ChoiceAnswer:
        temperature = self.temperature or getattr(self._controller.router, "temperature", DEFAULT_TEMPERATURE)
        utility = {name: decision.scores[name] - decision.cost_weight * decision.costs[name]
                   for name in decision.ranking}
        best = max(utility.values())
        weights = {name: math.exp(temperature * (u - best)) for name, u in utility.items()}
        total = sum(weights.values())
        probabilities = {label: weights.get(label, 0.0) / total for label in labels}
        return ChoiceAnswer(type="choice", choice=decision.expert, probabilities=probabilities,
                            confidence=probabilities[decision.expert])


def _state_prompt(state: Any) -> str | list[dict[str, Any]]:
    """A decision model's state as the core's prompt."""
    if isinstance(state, str):
        return state
    if isinstance(state, BaseMessage):
        return messages_to_prompt([state])
    if isinstance(state, Mapping) and "messages" in state:
        state = state["messages"]
    if isinstance(state, Sequence) and state and all(isinstance(m, BaseMessage) for m in state):
        return messages_to_prompt(list(state))
    raise ValueError("TORouterDecisionModel routes on a string, a message, a list of messages or a dict with "
                     f"'messages'; got {type(state).__name__}")


__all__ = ["TORouterDecisionModel"]
