"""``mfserve.training`` (source: ``training/``): the model side, the ``[train]`` extra.

Data loading, encoders, model fitting, evaluation, the artifact format, and the in-process
``Recommender`` that the server, ``mfserve evaluate`` and ``mfserve recommend`` all answer through.

May import: ``mfserve.v1`` and the root ``mfserve``, never ``mfserve.server`` or ``mfserve.client``
(the server imports the model side, not the reverse).
"""
