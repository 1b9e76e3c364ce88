"""``python -m deploy``: the ``llm-deploy`` command line."""

from deploy.cli import run

run()
