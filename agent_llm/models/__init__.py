"""The backends, under their names and the original framework's.

Importing this package loads no torch, transformers or FastChat; the HuggingFace backend
imports them when one is built.
"""

from __future__ import annotations

from agent_llm.backend import LanguageBackend
from agent_llm.models.fastchat import FastChatLanguageBackend
from agent_llm.models.huggingface import HuggingFaceLanguageBackend
from agent_llm.models.human import HumanLanguageBackend
from agent_llm.models.openai import OpenAILanguageBackend

# The names agents written against the original framework import.
FastChatAPILanguageBackend = FastChatLanguageBackend
OpenAIAPILanguageBackend = OpenAILanguageBackend
StdinLanguageBackend = HumanLanguageBackend

__all__ = [
    "FastChatAPILanguageBackend",
    "FastChatLanguageBackend",
    "HuggingFaceLanguageBackend",
    "HumanLanguageBackend",
    "LanguageBackend",
    "OpenAIAPILanguageBackend",
    "OpenAILanguageBackend",
    "StdinLanguageBackend",
]
