"""Data files read by ``deploy``: the recorded vLLM flag lists (see ``scripts/refresh-vllm-flags.py``)."""
