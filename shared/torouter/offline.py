"""Offline experts: deterministic answers by rule, for tests, examples, demos and benchmarks.

Routing needs experts to route to. These need no network, no weights and no time, and
give the same answer every time, so a test can say what an application routed to and
what came back. LangChain's and LlamaIndex's fakes (``langchain_torouter.fakes``,
``llamaindex_torouter.mock_llms``) are thin faces over :class:`OfflineExpert`: they
convert their framework's messages to the core's prompt format (``[{"role",
"content"}]`` dicts, or a plain string) and wrap its :class:`Reply`.

How an offline expert answers, in order:

- After a tool result (a ``tool`` message), it reports the result.
- In a ReAct prompt (the ``Thought: / Action: / Action Input:`` protocol with the tools
  listed as ``> Tool Name: / Tool Description: / Tool Args:``), it answers in that format:
  an action for the tool that fits the question, or the last observation as the answer.
- Arithmetic on two numbers (``3 + 4``, ``12 times 7``) is computed.
- A greeting is greeted back.
- Otherwise it extracts: the sentence of the prompt sharing the most content words with
  the question (ties: the earliest). With no sentence beside the question it says it has
  no rule; with sentences, none of them matching, that the text gives no answer.

The question is found the way the router finds it (:func:`torouter.routing_text.question_of`
takes it out of RAG templates), so template instructions rarely compete with the context.

With tools it calls the one the question names, else the one whose name and
description share the most words with it (always one when the call is forced), filling
the arguments from the JSON schema: a ``name(1, 'x')`` call written in the question,
else numbers in order, quoted strings, enum options the question mentions; required
fields left over get defaults (the question for text). An *answer tool* (structured
output) is filled from the answer instead: its text fields take the answer, its numbers
the answer's numbers. A hand-off tool (a ``handoff`` tool with ``to_agent``, whose
description lists the agents) hands off to the agent whose description fits best.

Usage is counted one token per word (:func:`count_tokens`), the unit answers are cut
and streamed in.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .data import Prompt, content_text
from .routing_text import is_observation, question_of

# Prompts are the core's: a string, or ``[{"role", "content"}]`` messages with roles
# ``system``, ``user``, ``assistant`` and ``tool`` (a tool result may name its tool under
# ``"name"``); LangChain's and LlamaIndex's other role names are read as these.

STOPWORDS = frozenset(
    "a an and are as at be by can could do does for from get has have how i in is it its me of on or "
    "please that the their this to tool use using was what when where which who why will with you your".split())
"""Words that say nothing about what is asked, left out when questions and texts are compared."""

GREETINGS = frozenset({"hello", "hi", "hey", "greet"})

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_TOKEN = re.compile(r"\S+\s*|\s+")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_ARITHMETIC = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(\+|-|\*|/|x|×|plus|minus|times|multiplied by|divided by)\s*(-?\d+(?:\.\d+)?)",
    re.IGNORECASE)
_OPERATORS: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "plus": operator.add, "-": operator.sub, "minus": operator.sub,
    "*": operator.mul, "x": operator.mul, "×": operator.mul, "times": operator.mul,
    "multiplied by": operator.mul, "/": operator.truediv, "divided by": operator.truediv,
}
_ASKS_FOR_TOOL = re.compile(r"\b(use|using|call)\b.*\btool\b", re.IGNORECASE)
# The tools of a ReAct header (as LlamaIndex's ReActChatFormatter writes them).
_REACT_TOOL = re.compile(
    r"^> Tool Name: (?P<name>[^\n]+)\nTool Description: (?P<desc>.*?)\nTool Args: (?P<args>[^\n]*)",
    re.MULTILINE | re.DOTALL)
_REACT_DONE = "Thought: I can answer without using any more tools. I'll use the user's language to answer\nAnswer: "
_HANDOFF = "handoff"
_CHOICES = ("auto", "none", "any", "required")  # tool_choice values that name no tool
_HANDOFF_AGENTS = re.compile(r"Currently available agents:\s*(\{.*\})", re.DOTALL)
_HANDOFF_RESULT = re.compile(r"^Agent \S+ is now handling the request")


# --- words, tokens and questions ----------------------------------------------------------
def _stem(word: str) -> str:
    """A crude stem (suffix off, six letters kept), so "monitored" meets "monitor", "multiplied" "multiply"."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:6]


def content_words(text: str) -> set[str]:
    """The stems of the words of ``text`` that say what it is about (no stopwords, no single letters)."""
    lowered = (w.lower() for w in _WORD.findall(text))
    return {_stem(w) for w in lowered if w not in STOPWORDS and len(w) > 1}


def token_pieces(text: str) -> list[str]:
    """``text`` cut into tokens, one per word with the space after it; they join back to ``text``."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Tokens as offline experts count them in usage: one per word."""
    return len(_TOKEN.findall(text))


def cut_answer(text: str, stop: Sequence[str] = (), max_tokens: int | None = None) -> tuple[str, int, str]:
    """``(text, tokens, finish reason)`` of an answer ended before the first stop sequence and cut to ``max_tokens``."""
    for sequence in stop:
        if sequence and sequence in text:
            text = text[: text.index(sequence)]
    tokens = _TOKEN.findall(text)
    if max_tokens is not None and len(tokens) > max_tokens:
        return "".join(tokens[:max_tokens]), max_tokens, "length"
    return "".join(tokens), len(tokens), "stop"


def question_in(text: str) -> str:
    """The question in a text: out of a RAG template if it is one, else its last line with a question mark,
    else its last line."""
    found = question_of(text)
    if found != text:
        return found.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    asked = [line for line in lines if "?" in line]
    return (asked or lines or [""])[-1]


def _role(message: Mapping[str, Any]) -> str:
    role = str(message.get("role", "user")).lower()
    return {"human": "user", "ai": "assistant", "model": "assistant", "chatbot": "assistant",
            "developer": "system", "function": "tool"}.get(role, role)


def _text(message: Mapping[str, Any]) -> str:
    return content_text(message.get("content", ""))


def _messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise TypeError(f"prompt message {i}: expected a {{'role', 'content'}} dict, got {type(message).__name__}")
    return list(prompt)


def _user_turn(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the latest user turn that is the user's words (not a ReAct observation), else -1."""
    for i in range(len(messages) - 1, -1, -1):
        if _role(messages[i]) == "user":
            text = _text(messages[i]).strip()
            if text and not is_observation(text):
                return i
    return -1


def _identity(text: str) -> str:
    return text


def best_sentence(question: str, texts: Sequence[str]) -> tuple[str, bool]:
    """The sentence of ``texts`` sharing the most content words with ``question`` (ties: the earliest).

    Returns ``(sentence, seen)``: the sentence, or ``""`` when none shares a word, and
    whether there were sentences besides the question at all.
    """
    asked = content_words(question)
    best, best_overlap, seen = "", 0, False
    for text in texts:
        body = text.replace(question, "\n") if question else text
        for sentence in (s.strip() for s in _SENTENCE.split(body)):
            if not sentence or sentence in question:
                continue
            seen = True
            overlap = len(asked & content_words(sentence))
            if overlap > best_overlap:
                best, best_overlap = sentence, overlap
    return best, seen


def arithmetic(question: str) -> str | None:
    """The result of arithmetic on two numbers in ``question`` (``12 times 7``), or None when it has none."""
    match = _ARITHMETIC.search(question)
    if match is None:
        return None
    a, op, b = float(match.group(1)), match.group(2).lower(), float(match.group(3))
    if op in ("/", "divided by") and b == 0:
        return "Division by zero is undefined."
    return f"The answer is {_format_number(_OPERATORS[op](a, b))}."


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


# --- tools --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolSpec:
    """A tool an expert may call: its name, description and JSON schema of arguments.

    ``answers``: an answer tool (structured output) is called with the answer, not run.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    answers: bool = False


@dataclass(frozen=True)
class ToolCall:
    """A call to a tool: its name, arguments and a deterministic id."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class Reply:
    """An offline expert's turn: a text answer, or a tool call."""

    text: str = ""
    tool_call: ToolCall | None = None


def _handoff_target(description: str, question: str) -> tuple[str | None, int]:
    """The agent listed in a hand-off tool's description that fits the question best, and by how many words."""
    found = _HANDOFF_AGENTS.search(description)
    if not found:
        return None, 0
    try:
        agents = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return None, 0
    if not isinstance(agents, dict):
        return None, 0
    asked = content_words(question)
    best, best_overlap = None, 0
    for name, about in agents.items():
        overlap = len(asked & content_words(f"{name} {about}"))
        if overlap > best_overlap:
            best, best_overlap = str(name), overlap
    return best, best_overlap


def _is_handoff(tool: ToolSpec) -> bool:
    return tool.name == _HANDOFF and "to_agent" in (tool.parameters.get("properties") or {})


def best_tool(question: str, tools: Sequence[ToolSpec]) -> tuple[ToolSpec, int]:
    """The tool ``question`` names, else the one whose name and description share most words with it.

    Returns the tool and how well it fits (words shared; 100 when named); a hand-off tool
    fits as well as the best agent it lists. Ties go to the earliest tool.
    """
    if not tools:
        raise ValueError("best_tool needs at least one tool")
    asked = content_words(question)
    best, best_score = tools[0], 0
    for tool in tools:
        if re.search(rf"\b{re.escape(tool.name)}\b", question):
            return tool, 100
        if _is_handoff(tool):
            score = _handoff_target(tool.description, question)[1]
        else:
            score = len(asked & (content_words(tool.name.replace("_", " ")) | content_words(tool.description)))
        if score > best_score:
            best, best_score = tool, score
    return best, best_score


def fill_arguments(tool: ToolSpec, question: str, answer: str | None = None) -> dict[str, Any]:
    """Arguments for calling ``tool`` about ``question``, read from the question against the tool's JSON schema.

    A ``name(1, 'x')`` call written in the question gives them in order; else numeric
    fields take the question's numbers in order, enum fields the option the question
    mentions (else the first), text fields its quoted strings; required fields left over
    get the question (text), 0, True, a one-item list or a filled object. With
    ``answer`` (an answer tool), text defaults to the answer and numbers come from it
    when it holds any. A hand-off tool gets the agent that fits and why.
    """
    if _is_handoff(tool):
        target, _ = _handoff_target(tool.description, question)
        if target is not None:
            return {"to_agent": target, "reason": f"{target} is suited to: {question}"}
    explicit = _explicit_args(tool.name, question)
    numbers = [] if explicit is not None else [float(n) for n in _NUMBER.findall(question)]
    if explicit is None and answer is not None and _NUMBER.search(answer):
        numbers = [float(n) for n in _NUMBER.findall(answer)]
    filler = _Filler(question=question, text=question if answer is None else answer,
                     defs=tool.parameters.get("$defs") or tool.parameters.get("definitions") or {},
                     explicit=explicit or [], numbers=numbers,
                     quoted=[a or b for a, b in _QUOTED.findall(question)])
    return filler.object(tool.parameters)


_MISSING = object()


@dataclass
class _Filler:
    """Takes values for a schema's fields from what a question offers, in order."""

    question: str
    text: str
    defs: Mapping[str, Any]
    explicit: list[Any]
    numbers: list[float]
    quoted: list[str]

    def object(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        required = set(schema.get("required") or ())
        args: dict[str, Any] = {}
        for key, prop in (schema.get("properties") or {}).items():
            value = self.value(prop, key in required)
            if value is not _MISSING:
                args[key] = value
        return args

    def value(self, prop: Mapping[str, Any], required: bool) -> Any:
        prop = self._resolved(prop)
        kind = _json_type(prop)
        if self.explicit:
            return _as_kind(self.explicit.pop(0), kind)
        if "enum" in prop:
            options = list(prop["enum"])
            return next((o for o in options if str(o).lower() in self.question.lower()), options[0])
        if kind in ("integer", "number") and self.numbers:
            return _as_kind(self.numbers.pop(0), kind)
        if kind == "string" and self.quoted:
            return self.quoted.pop(0)
        if not required:
            return _MISSING
        if kind == "array":
            item = self.value(prop.get("items") or {}, True)
            return [] if item is _MISSING else [item]
        if kind == "object":
            return self.object(prop)
        return {"integer": 0, "number": 0, "boolean": True}.get(kind, self.text)

    def _resolved(self, prop: Mapping[str, Any]) -> Mapping[str, Any]:
        for _ in range(32):  # a chain of references, not a cycle
            if "$ref" not in prop:
                break
            prop = self.defs.get(str(prop["$ref"]).rsplit("/", 1)[-1], {})
        for option in prop.get("anyOf") or prop.get("oneOf") or ():
            if _json_type(option) != "null":
                return {**{k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")}, **self._resolved(option)}
        return prop


def _json_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and "properties" in schema:
        return "object"
    return kind or "string"


def _as_kind(value: Any, kind: str) -> Any:
    """``value`` as the schema's kind: integers whole, numbers float (as a typed tool would receive them)."""
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "string" and not isinstance(value, str):
        return str(value)
    return value


def _explicit_args(name: str, question: str) -> list[Any] | None:
    """Positional literals of a ``name(...)`` call written in the question, if there is one."""
    match = re.search(rf"\b{re.escape(name)}\s*\(([^()]*)\)", question)
    if match is None:
        return None
    try:
        values = ast.literal_eval(f"[{match.group(1)}]")
    except (ValueError, SyntaxError):
        return None
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]


def _call_id(name: str, question: str, turn: int) -> str:
    return "call_" + uuid.uuid5(uuid.NAMESPACE_URL, f"{name}|{question}|{turn}").hex[:16]


# --- the expert -----------------------------------------------------------------------------
@dataclass
class OfflineExpert:
    """A deterministic offline expert, free of any framework: prompts in, :class:`Reply` out.

    ``name`` is how it introduces itself. ``signed`` experts put ``[name]`` before every
    answer, so a reader of a demo sees who answered, and report a tool's result under
    that signature as it came; unsigned ones answer as a provider model would and say
    which tool returned what. ``unwrap`` takes the user's words out of a framework's
    own wrapper prompts before the question is looked for (identity by default).
    """

    name: str = "offline"
    signed: bool = False
    unwrap: Callable[[str], str] = _identity

    # -- reading the prompt
    def question(self, prompt: Prompt) -> str:
        """What is being asked: the latest user turn's question (observations skipped), or a string's."""
        if isinstance(prompt, str):
            return question_in(self.unwrap(prompt))
        messages = _messages(prompt)
        at = _user_turn(messages)
        return question_in(self.unwrap(_text(messages[at]).strip())) if at >= 0 else ""

    @staticmethod
    def tool_result(prompt: Prompt) -> tuple[str, str] | None:
        """``(tool name, result)`` when the prompt ends with a tool result (a hand-off is none: the new agent
        starts on the question)."""
        messages = [] if isinstance(prompt, str) else _messages(prompt)
        if not messages or _role(messages[-1]) != "tool":
            return None
        name = str(messages[-1].get("name") or "tool")
        return None if name == _HANDOFF else (name, _text(messages[-1]))

    # -- answering
    def answer(self, prompt: Prompt) -> str:
        """The answer to ``prompt`` by the rules (tool result, arithmetic, greeting, extraction), signed if set."""
        return self._signed(self.plain_answer(prompt))

    def plain_answer(self, prompt: Prompt) -> str:
        """The answer without a signature (what an answer tool is filled with)."""
        result = self.tool_result(prompt)
        if result is not None:
            return result[1] if self.signed else f"The {result[0]} tool returned: {result[1]}"
        question = self.question(prompt)
        computed = arithmetic(question)
        if computed is not None:
            return computed
        asked = content_words(question)
        if asked & GREETINGS and len(asked) <= 3:
            return f"Hello! I am {self.name}. How can I help you today?"
        texts = [prompt] if isinstance(prompt, str) else [
            _text(m) for m in _messages(prompt) if _role(m) in ("system", "user", "assistant")]
        sentence, seen = best_sentence(question, texts)
        if sentence:
            return sentence
        if not question:
            return "There is no question to answer."
        if seen:
            return f"The text gives no answer to: {question}"
        return f"I have no rule to answer that. You asked: {question}"

    def _signed(self, text: str) -> str:
        return f"[{self.name}] {text}" if self.signed else text

    # -- replying, with tools
    def reply(self, prompt: Prompt, tools: Sequence[ToolSpec] = (), tool_choice: str | bool | None = "auto") -> Reply:
        """The expert's turn: a tool call, a ReAct step, or an answer.

        ``tool_choice``: ``"auto"``/None (call when a tool fits the question),
        ``"any"``/``"required"``/True (always call one), ``"none"``/False, or a tool's name.
        """
        call = self.tool_call(prompt, tools, tool_choice)
        if call is not None:
            return Reply(tool_call=call)
        react = None if self.tool_result(prompt) is not None else self.react(prompt)
        return Reply(text=react if react is not None else self.answer(prompt))

    def tool_call(self, prompt: Prompt, tools: Sequence[ToolSpec],
                  tool_choice: str | bool | None = "auto") -> ToolCall | None:
        """The tool call for this turn, or None when the expert answers in text (see :meth:`reply`)."""
        if not tools or tool_choice in ("none", False):
            return None
        messages = _messages(prompt)
        named = tool_choice if isinstance(tool_choice, str) and tool_choice not in _CHOICES else None
        if named is not None and named not in {t.name for t in tools}:
            raise ValueError(f"tool_choice {named!r} is not one of the tools {[t.name for t in tools]}")
        forced = named is not None or tool_choice in ("any", "required", True)
        after_tool = self.tool_result(messages) is not None
        if after_tool and not forced:
            return None  # a tool has answered: reply in text
        question = self.question(messages)
        answers = [t for t in tools if t.answers]
        if named is not None:
            tool = next(t for t in tools if t.name == named)
        elif answers and after_tool:
            tool, _ = best_tool(question, answers)  # a tool has answered: give the structured answer
        else:
            tool, fit = best_tool(question, tools)
            if forced and answers and fit == 0:
                tool, _ = best_tool(question, answers)  # no tool to run fits: answer directly
            elif not forced and fit == 0 and not (_ASKS_FOR_TOOL.search(question) and len(tools) == 1):
                return None
        answer = self.plain_answer(messages) if tool.answers else None
        return ToolCall(tool.name, fill_arguments(tool, question, answer), _call_id(tool.name, question, len(messages)))

    def react(self, prompt: Prompt) -> str | None:
        """The next ReAct step if the system prompt sets out the ReAct format, else None."""
        if isinstance(prompt, str):
            return None
        messages = _messages(prompt)
        system = "\n".join(_text(m) for m in messages if _role(m) == "system")
        if "Action Input:" not in system or "Thought:" not in system:
            return None
        at = _user_turn(messages)
        observations = [_text(m).strip() for m in messages[at + 1:]
                        if _role(m) in ("user", "tool") and is_observation(_text(m))]
        if observations:
            observation = observations[-1].split(":", 1)[1].strip()
            if not _HANDOFF_RESULT.match(observation):
                return _REACT_DONE + self._signed(observation)
        tools = list(_react_tools(system))
        question = self.question(messages)
        if tools:
            tool, fit = best_tool(question, tools)
            if fit > 0:
                return (f"Thought: I need to use a tool to help me answer the question.\nAction: {tool.name}\n"
                        f"Action Input: {json.dumps(fill_arguments(tool, question))}")
        conversation = [m for m in messages if _role(m) != "system"]
        return _REACT_DONE + self.answer(conversation)



def _react_tools(system: str) -> Iterator[ToolSpec]:
    for found in _REACT_TOOL.finditer(system):
        try:
            schema = json.loads(found.group("args"))
        except json.JSONDecodeError:
            continue
        if isinstance(schema, dict):
            yield ToolSpec(found.group("name").strip(), found.group("desc").strip(), schema)


__all__ = ["GREETINGS", "STOPWORDS", "OfflineExpert", "Reply", "ToolCall", "ToolSpec", "arithmetic",
           "best_sentence", "best_tool", "content_words", "count_tokens", "cut_answer", "fill_arguments",
           "question_in", "token_pieces"]
