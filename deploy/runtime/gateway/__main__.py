"""``python -m deploy.runtime.gateway``."""

from deploy.runtime.gateway.cli import main

main()
