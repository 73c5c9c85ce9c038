"""Secure aggregation for medsilo: the server learns only the sum of the sites' updates.

SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour graph (Bell et al., CCS 2020) as
an option, free of any Flower dependency so both the ServerApp and the ClientApp drive it:

- ``quantize.py``  float update → uint32 in the ring Z_{2³²} (clip, stochastic rounding), and
  back from the sum, with an exact error bound;
- ``graph.py``     who masks with whom (complete graph = SecAgg, random Harary graph = SecAgg+);
- ``shamir.py``    t-of-n Shamir sharing over GF(2⁵²¹ − 1);
- ``crypto.py``    X25519, HKDF-SHA256, ChaCha20-Poly1305 share encryption, ChaCha20 masks;
- ``identity.py``  the sites' provisioned P-384 signing keys and the CA-signed roster;
- ``messages.py``  the keys of every stage message (all ConfigRecord values);
- ``client.py``    the site's five stage functions (state in, state + reply out);
- ``server.py``    ``setup`` (stage 0) and ``SecAggServer`` (routing, checks, unmasking);
- ``loopback.py``  a whole round in one process (the reference call sequence);
- ``errors.py``    SecAggAborted, SecAggProtocolError, ShareDecryptionError, RevealRefused.

``python -m privacy.secagg.benchmark`` times every stage on this machine.
"""

from privacy.secagg.client import (
    advertise_keys,
    confirm_survivors,
    masked_input,
    share_keys,
    threshold_floor,
    unmask,
)
from privacy.secagg.errors import (
    RevealRefused,
    SecAggAborted,
    SecAggProtocolError,
    ShareDecryptionError,
)
from privacy.secagg.graph import neighbour_graph, suggested_degree
from privacy.secagg.identity import IdentityError, Roster, SiteIdentity
from privacy.secagg.quantize import (
    dequantize,
    quantization_error_bound,
    quantization_scale,
    quantize,
)
from privacy.secagg.server import SecAggPlan, SecAggServer, default_threshold, setup

__all__ = [
    "IdentityError", "RevealRefused", "Roster", "SecAggAborted", "SecAggPlan",
    "SecAggProtocolError", "SecAggServer", "ShareDecryptionError", "SiteIdentity",
    "advertise_keys", "confirm_survivors", "default_threshold", "dequantize", "masked_input",
    "neighbour_graph", "quantization_error_bound", "quantization_scale", "quantize", "setup",
    "share_keys", "suggested_degree", "threshold_floor", "unmask",
]
