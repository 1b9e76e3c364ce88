"""Pure rendering: a validated spec in, what each host runs out (argv, environment, files).

- :mod:`~deploy.render.components`: one :class:`Component` per process, its argv and host paths;
- :mod:`~deploy.render.supervisord`: a host's ``supervisord.conf`` and its fingerprint;
- :mod:`~deploy.render.slurm`: a Slurm replica's batch script, files, squeue/sbatch answers;
- :mod:`~deploy.render.vllm`: the vLLM kinds' command lines, recorded flags, versions, metrics.

No connector, no HTTP: imports only :mod:`deploy.spec`, :mod:`deploy.errors` and the record
formats of :mod:`deploy.runtime`.
"""
