"""The exceptions ``agent_llm`` raises.

Everything a backend raises on purpose derives from :class:`AgentLLMError`; errors of the
libraries underneath (openai, httpx, transformers) are translated at the boundary with
``raise ... from`` so callers never need to import them::

    AgentLLMError
    ├── ConfigurationError            a backend setting is missing or wrong (names the key)
    ├── ContextLengthExceededError    prompt tokens + max new tokens > context_length (also a ValueError)
    ├── ChoiceError                   no option could be matched to the model's (or human's) answer
    ├── StructuredOutputError         the answer is not JSON valid against the schema (also a ValueError)
    ├── HumanInputClosedError         the Human backend's input stream ended
    └── BackendError                  a request to a model server failed
        ├── AuthenticationError       401/403: the API key was rejected (never retried)
        ├── ModelNotFoundError        the server does not serve model_id (never retried)
        ├── BadRequestError           any other 4xx the server refused (never retried)
        └── ServiceUnavailableError   connection errors, timeouts, 429 and 5xx, after the retries
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentLLMError",
    "AuthenticationError",
    "BackendError",
    "BadRequestError",
    "ChoiceError",
    "ConfigurationError",
    "ContextLengthExceededError",
    "HumanInputClosedError",
    "ModelNotFoundError",
    "ServiceUnavailableError",
    "StructuredOutputError",
]


class AgentLLMError(Exception):
    """Base class of every error ``agent_llm`` raises on purpose."""


class ConfigurationError(AgentLLMError):
    """A backend setting is missing or inconsistent; the message names the config key."""


class ContextLengthExceededError(AgentLLMError, ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context.

    Attributes:
        prompt_tokens: Tokens in the prompt, as the model sees it (None when the server did not say).
        max_new_tokens: Tokens reserved for the answer (0 when unknown).
        context_length: The model's context length.
    """

    def __init__(
        self, prompt_tokens: int | None, max_new_tokens: int, context_length: int, model_id: str
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        self.model_id = model_id
        shown = "an unknown number of" if prompt_tokens is None else str(prompt_tokens)
        super().__init__(
            f"{model_id}: prompt of {shown} tokens + {max_new_tokens} new tokens does not fit "
            f"in the context length of {context_length} tokens; shorten the messages or lower max_new_tokens"
        )


class ChoiceError(AgentLLMError):
    """No option matched the answer, after the re-ask.

    Attributes:
        answer: The last answer that was tried.
        options: The options offered.
    """

    def __init__(self, answer: str, options: Sequence[str], detail: str = "") -> None:
        self.answer = answer
        self.options = list(options)
        shown = ", ".join(repr(o) for o in self.options[:10]) + (" ..." if len(self.options) > 10 else "")
        super().__init__(f"answer {answer!r} matches none of the options [{shown}]{detail}")


class StructuredOutputError(AgentLLMError, ValueError):
    """The answer is not JSON valid against the schema (after the re-ask, where there was one).

    Attributes:
        answer: The last answer's text.
        problem: What is wrong with it (the validation error).
    """

    def __init__(self, answer: str, problem: str, detail: str = "") -> None:
        self.answer = answer
        self.problem = problem
        shown = answer if len(answer) <= 200 else answer[:200] + "..."
        super().__init__(f"{problem}{detail} Answer: {shown!r}")


class HumanInputClosedError(AgentLLMError, EOFError):
    """The Human backend's input stream ended (Ctrl-D, closed pipe) while an answer was awaited."""


class BackendError(AgentLLMError):
    """A request to a model server failed.

    Attributes:
        status_code: The HTTP status, when there was a response.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class AuthenticationError(BackendError):
    """The server rejected the API key (HTTP 401 or 403)."""


class ModelNotFoundError(BackendError):
    """The server does not serve the configured ``model_id``."""


class BadRequestError(BackendError):
    """The server refused the request (a 4xx other than the ones above); retrying will not help."""


class ServiceUnavailableError(BackendError):
    """The server was unreachable or kept failing (connection, timeout, 429, 5xx) until retries ran out."""
