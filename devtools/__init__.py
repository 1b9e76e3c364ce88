"""Development tools: test hosts (netns + sshd), a hand-started FastChat stack, spec builders.

Used by ``tests/`` and ``bench/``; not part of the wheel (``pyproject.toml`` packages only
``agent_llm`` and ``deploy``).
"""
