"""The paper's equations: local soft clustering (eq. 3), cluster-based decoding (eq. 5), hard clusters.

``clustering`` and ``decode`` are the fast path (``hcformer.ops.fast``); ``hcformer.ops.reference``
holds the appendix-C unfold/einsum listings they are tested against.
"""

from hcformer.ops.fast import clustering, clustering_macs, decode, decode_macs
from hcformer.ops.hierarchy import hard_clusters, hard_parents

__all__ = [
    "clustering",
    "clustering_macs",
    "decode",
    "decode_macs",
    "hard_clusters",
    "hard_parents",
]
