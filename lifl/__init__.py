"""LIFL: serverless, event-driven aggregation of federated-learning updates.

Public entry points: :class:`lifl.client.Client`, :class:`lifl.server.EmbeddedServer`,
:class:`lifl.config.ServerConfig` and the ``lifl`` command line.
"""
__version__ = "0.1.0"
