"""``python -m deploy.runtime.vllm_bridge``."""

from __future__ import annotations

from deploy.runtime.vllm_bridge.cli import main

main()
