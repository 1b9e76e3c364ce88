"""``make demo``: the local default cluster up, then used the way an agent uses it.

1. ``llm-deploy up configs/cluster/local.yaml`` (builds the tiny model under
   ``.cache/models/toy-model`` the first time; a second run finds everything up and changes
   nothing);
2. the generated ``configs/llm/fschat/tiny.yaml`` composed with Hydra and instantiated, as agent
   code does, then one ``chat_completion`` and one ``choose_from_options``;
3. how to look at it and stop it.

Run from the repository root: ``python -m deploy.demo``.
"""

from __future__ import annotations

import sys
from pathlib import Path

SPEC = Path("configs/cluster/local.yaml")


def main() -> int:
    """Run the demo; returns the exit code."""
    from rich.console import Console

    from deploy import api
    from deploy.console import ConsoleReporter
    from deploy.errors import DeployError
    from deploy.spec.load import load_cluster_spec

    console = Console(highlight=False)
    console.print(f"[bold]1. llm-deploy up {SPEC}[/bold]")
    try:
        spec = load_cluster_spec(SPEC)
        result = api.up(spec, output_dir=Path("."), reporter=ConsoleReporter(console))
    except DeployError as exc:
        for line in [*str(exc).splitlines()[1:], *exc.details()]:
            console.print(line, markup=False)
        console.print(f"[red]✗ {str(exc).splitlines()[0]}[/red]")
        return 1
    console.print(f"   serving {', '.join(m.name for m in result.models)} at {result.base_url}")

    model = result.models[0].name
    console.print(
        f"\n[bold]2. the generated config configs/llm/fschat/{model}.yaml, as an agent uses it[/bold]"
    )
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base=None):
        cfg = compose(overrides=[f"+llm=fschat/{model}"])
    backend = instantiate(cfg.llm)(logger=None)  # the key comes from .env (FASTCHAT_API_KEY)
    console.print(
        f"   {type(backend).__name__}(model_id={backend.model_id!r}, server_ip={cfg.llm.server_ip!r})",
        soft_wrap=True,
    )
    messages = [{"role": "user", "content": "Say hello to the demo."}]
    reply = backend.chat_completion(messages, max_tokens=16, temperature=0)
    console.print(f"   chat_completion -> {reply!r}", markup=False)
    options = ["red", "green", "blue"]
    choice = backend.choose_from_options([{"role": "user", "content": "Pick a colour."}], options)
    console.print(f"   choose_from_options({options}) -> {choice!r}", markup=False)
    console.print("   (a random tiny model: the words mean nothing, the plumbing is real)")

    console.print("\n[bold]3. look at it, stop it[/bold]")
    for command in (f"status {SPEC}", f"logs worker-{model}-0 {SPEC}", f"down {SPEC}"):
        console.print(f"   .venv/bin/llm-deploy {command}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
