"""``RuleBasedFakeChatModel`` is LangChain's face of ``torouter.offline``: the answers are the core's."""

from __future__ import annotations

from langchain_core.messages import HumanMessage, SystemMessage

from langchain_torouter import ChatRuleBased, RuleBasedFakeChatModel
from torouter import offline
from torouter.offline import OfflineExpert


def test_langchain_fake_answers_with_the_core(monkeypatch):
    assert issubclass(ChatRuleBased, RuleBasedFakeChatModel)
    model = RuleBasedFakeChatModel(model="local")
    messages = [SystemMessage("Lima is the capital of Peru."), HumanMessage("What is the capital of Peru?")]
    prompt = [{"role": "system", "content": "Lima is the capital of Peru."},
              {"role": "user", "content": "What is the capital of Peru?"}]
    assert model.invoke(messages).content == OfflineExpert(name="local").answer(prompt)
    monkeypatch.setattr(offline.OfflineExpert, "plain_answer", lambda self, prompt: "from the core")
    assert model.invoke(messages).content == "from the core"
