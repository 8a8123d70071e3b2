"""``mfserve bench``: closed-loop gRPC load against mfserve, an empty handler and a naive servicer.

Installed with the ``[server]`` extra so a deployment can be measured where it runs; every server
and every load client is its own process (``python -m mfserve.server.bench.<module>``).
"""
