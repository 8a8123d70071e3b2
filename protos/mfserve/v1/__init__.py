"""``mfserve.v1`` (source: ``protos/mfserve/v1/``): the contract, ``recommender.proto``, and the
code grpcio-tools generates from it.

Regenerate with ``python protos/generate.py``; never edit the ``*_pb2*`` files by hand.

May import: only itself (and grpcio, protobuf); every other package may import it.
"""
