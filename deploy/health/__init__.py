"""Judging a cluster: readiness, doctor, status, watch.

- :mod:`~deploy.health.ladder`: the readiness ladder (ready means serving);
- :mod:`~deploy.health.doctor` and :mod:`~deploy.health.doctor_rules` (pure): preflight checks;
- :mod:`~deploy.health.status` and :mod:`~deploy.health.restarts` (pure): one observation, judged;
- :mod:`~deploy.health.watch`: status at an interval, state changes, webhooks.
- :mod:`~deploy.health.slurm_checks`: doctor rows for Slurm login nodes.
"""
