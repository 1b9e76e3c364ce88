"""Changing a cluster: plan, then act.

- :mod:`~deploy.orchestration.plan`: (spec, observed state) -> actions (pure);
- :mod:`~deploy.orchestration.admission`: what ``up`` may start after doctor;
- :mod:`~deploy.orchestration.up`: the phases of ``up``;
- :mod:`~deploy.orchestration.clientconfig`: the verified client config for ``agent_llm``;
- :mod:`~deploy.orchestration.keychange`: adding, removing and rotating API keys.
- :mod:`~deploy.orchestration.slurm`: Slurm replicas: secrets, submission, PENDING, cancellation.
"""
