"""Router data preparation (the paper's phase 1): query every expert, score the answers.

``prepare`` sends every prompt to every expert of a manifest (``experts.yaml``),
records each answer's text, tokens, latency, cost and, for local models, the NLL of
the reference, scores it against the reference and writes routing data for
``torouter train``. Calls are cached in SQLite, so an interrupted run resumes.
Needs the ``prepare`` extra (pyyaml, bert-score, gguf, accelerate, datasets).
"""

from .cache import CacheError, CallCache
from .experts import Answer, Expert, ExpertSpec, Manifest, ManifestError, build_expert, build_experts, load_manifest
from .loaders import LOADERS, load_benchmark
from .pipeline import (PrepareError, PrepareSummary, PromptItem, demo_prompts, demo_prompts_path, prepare,
                       read_prompts, rescore, resolve_prompts)
from .runner import Backoff, Job, Runner, RunStats, is_transient
from .scorers import METRICS, ScoreError, ScorerConfig, make_scorer

__all__ = [
    "Answer", "Backoff", "CacheError", "CallCache", "Expert", "ExpertSpec", "Job", "LOADERS", "METRICS",
    "Manifest", "ManifestError", "PrepareError", "PrepareSummary", "PromptItem", "RunStats", "Runner",
    "ScoreError", "ScorerConfig", "build_expert", "build_experts", "demo_prompts", "demo_prompts_path",
    "is_transient", "load_benchmark", "load_manifest", "make_scorer", "prepare", "read_prompts", "rescore",
    "resolve_prompts",
]
