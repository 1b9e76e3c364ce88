"""Secrets and trust: the API key store, its file on the API host, secret files, TLS trust.

- :mod:`~deploy.security.keystore`: the named keys as a value (pure);
- :mod:`~deploy.security.hostkeys`: the store on the API server's host;
- :mod:`~deploy.security.secretfiles`: writing a secret file (0600 from creation, atomic);
- :mod:`~deploy.security.tls`: trusting the API server's own certificate.
"""
