import subprocess
import sys

HEAVY = ("torch", "transformers", "fastchat", "tokenizers", "fabric", "paramiko")


def test_import_agent_llm_pulls_in_nothing_heavy() -> None:
    code = (
        f"import sys, agent_llm, agent_llm.models\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import agent_llm loaded: {out.stdout.strip()}"
