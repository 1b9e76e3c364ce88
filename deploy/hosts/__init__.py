"""I/O with the hosts: connectors, the host-agent client, each host's supervisord, observed state.

- :mod:`~deploy.hosts.connector`: the narrow interface (run, put, get) and the local one;
- :mod:`~deploy.hosts.ssh`: the SSH connector (Fabric);
- :mod:`~deploy.hosts.agent`: the client of :mod:`deploy.runtime.hostagent`;
- :mod:`~deploy.hosts.supervisor`: driving this cluster's supervisord on one host;
- :mod:`~deploy.hosts.group`: every host of a spec at once (one result per host);
- :mod:`~deploy.hosts.observed`: what runs where, as values.

Never imports :mod:`deploy.health`, :mod:`deploy.orchestration` or :mod:`deploy.api`.
"""
