"""Router data preparation (the paper's phase 1): query every expert, score the answers.

``prepare`` sends every prompt to every expert of a manifest (``experts.yaml``),
records each answer's text, tokens, latency, cost and, for local models, the NLL of
the reference, scores it (against the reference, or with an LLM judge: ``judge``) and writes routing data for
``torouter train``. Calls are cached in SQLite, so an interrupted run resumes.
Needs the ``prepare`` extra (pyyaml, bert-score, gguf, accelerate, datasets).

An expert is built one way, wherever it is used (``prepare``, ``ChatManifestExpert``,
the endpoint): ``manifest`` reads and checks ``experts.yaml``; ``backends`` builds each
entry with the backend it names (``register_backend`` adds backends); ``base`` is the
``Expert`` interface every backend implements; ``clients`` holds the LangChain,
LlamaIndex and Python backends and ``build_chat_model``; ``local`` the Hugging Face one.
"""

from .cache import CacheError, CallCache
from .backends import backend_names, build_expert, build_experts, get_backend, register_backend, unregister_backend
from .base import Answer, Expert
from .clients import build_chat_model
from .manifest import (BackendSpec, ExpertBuildError, ExpertSpec, Generation, KwargsSpec, LangChainSpec, Manifest,
                       ManifestError, Price, load_manifest, parse_manifest)
from .judge import DEFAULT_RUBRIC, JudgeConfig, JudgeError, JudgeSummary, judge_expert, load_judge_config
from .loaders import LOADERS, NATURAL_METRICS, load_benchmark
from .pipeline import (PrepareError, PrepareSummary, PromptItem, Scoring, demo_prompts, demo_prompts_path,
                       make_scoring, prepare, read_prompts, rescore, resolve_prompts)
from .runner import Backoff, Job, Runner, RunStats, is_transient
from .scorers import METRICS, SCORING_METRICS, MetricMap, ScoreError, ScorerConfig, make_scorer

__all__ = [
    "DEFAULT_RUBRIC", "JudgeConfig", "JudgeError", "JudgeSummary", "MetricMap", "NATURAL_METRICS",
    "SCORING_METRICS", "Scoring", "judge_expert", "load_judge_config", "make_scoring",
    "Answer", "BackendSpec", "Backoff", "CacheError", "CallCache", "Expert", "ExpertBuildError", "ExpertSpec",
    "Generation", "Job", "KwargsSpec", "LOADERS", "LangChainSpec", "METRICS", "Manifest", "ManifestError",
    "PrepareError", "PrepareSummary", "Price", "PromptItem", "RunStats", "Runner", "ScoreError", "ScorerConfig",
    "backend_names", "build_chat_model", "build_expert", "build_experts", "demo_prompts", "demo_prompts_path",
    "get_backend", "is_transient", "load_benchmark", "load_manifest", "make_scorer", "parse_manifest", "prepare",
    "read_prompts", "register_backend", "rescore", "resolve_prompts", "unregister_backend",
]
