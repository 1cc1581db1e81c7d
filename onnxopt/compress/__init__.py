"""The compression engine: codebooks, 1-D k-means, weight sharing, repair, channel pruning, FLOPs, low rank.

Engines never import ``pass_base`` or ``context``: they take plain arguments and return results."""
