"""The Ansible path: the inventory from a spec, and what the roles run on each host.

- :mod:`~deploy.fleet.inventory`: ``llm-deploy inventory`` (pure);
- :mod:`~deploy.fleet.host`: ``python -m deploy.fleet.host OP`` on each host (render, start);
- :mod:`~deploy.fleet.ready`: the playbook's last step (``up``'s ladder and client config).
"""
