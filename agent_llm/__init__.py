"""LLM backends for agents: one interface over HuggingFace, FastChat, OpenAI and a human.

``import agent_llm`` is light (no torch, transformers or FastChat); the backends live in
:mod:`agent_llm.models`, the errors in :mod:`agent_llm.errors`.
"""

from __future__ import annotations

from agent_llm.backend import LanguageBackend, MetricsLogger, OptionScores, ScoringUnavailable
from agent_llm.errors import (
    AgentLLMError,
    AuthenticationError,
    BackendError,
    BadRequestError,
    ChoiceError,
    ConfigurationError,
    ContextLengthExceededError,
    HumanInputClosedError,
    ModelNotFoundError,
    ServiceUnavailableError,
    StructuredOutputError,
)
from agent_llm.structured import ToolCall, ToolReply

__all__ = [
    "AgentLLMError",
    "AuthenticationError",
    "BackendError",
    "BadRequestError",
    "ChoiceError",
    "ConfigurationError",
    "ContextLengthExceededError",
    "HumanInputClosedError",
    "LanguageBackend",
    "MetricsLogger",
    "ModelNotFoundError",
    "OptionScores",
    "ScoringUnavailable",
    "ServiceUnavailableError",
    "StructuredOutputError",
    "ToolCall",
    "ToolReply",
]
