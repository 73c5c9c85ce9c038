"""The wire format of the SecAgg stages: the keys of every stage message, and the exact bytes
each site signs.

Every message is a flat ``dict[str, value]`` whose values are Flower ConfigRecord values
(``bytes``, ``int``, ``str``, ``bool`` or lists of one of these; never ``None``, never a nested
dict), so the driver can send it as ``ConfigRecord(message)`` and read it back with
``dict(record)``. The only exception is the masked input itself, a 1-D ``uint32`` array that
travels in an ArrayRecord (same bytes per coordinate as the fp32 plaintext).

Each message carries the round's ``session`` id and the ``index`` of the participant it comes
from (site → server) or is addressed to (server → site): a message replayed from another round
or delivered to the wrong site is rejected by the receiver before anything is used.

Stage                 direction       keys
--------------------  --------------  ---------------------------------------------------------
0 setup               server → site   session, index, num-participants, threshold, neighbours
1 advertise keys      site → server   session, index, c-public-key, s-public-key, site-id,
                                      key-signature
1→2 route keys        server → site   session, index, key-owners, c-public-keys, s-public-keys,
                                      key-site-ids, key-signatures
2 share keys          site → server   session, index, receivers, ciphertexts
2→3 route shares      server → site   session, index, senders, ciphertexts
3 masked input        site → server   session, index           (+ the uint32 masked vector)
3→3b consistency      server → site   session, index, survivor-set
3b consistency        site → server   session, index, survivor-set-signature
3b→4 unmask request   server → site   session, index, survivors, dropped, survivor-set,
                                      signer-indices, signer-site-ids, signer-signatures
4 unmask              site → server   session, index, b-owners, b-shares, s-owners, s-shares

Signed statements (ECDSA-SHA384 with the site's provisioned identity key, identity.py):
:func:`key_statement` in stage 1, :func:`survivor_set_statement` in stage 3b. Each starts with
the protocol version and a purpose label, so a signature of one kind never verifies as another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from privacy.secagg.errors import SecAggProtocolError

# Stage names, used in errors, in SecAggAborted.stage and as suggested message-type suffixes.
STAGE_SETUP = "setup"
STAGE_ADVERTISE_KEYS = "advertise-keys"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_SETUP, STAGE_ADVERTISE_KEYS, STAGE_SHARE_KEYS, STAGE_MASKED_INPUT,
          STAGE_CONSISTENCY, STAGE_UNMASK)

# Keys present in every message.
SESSION = "session"
INDEX = "index"

# Stage 0: the site's part of the plan.
NUM_PARTICIPANTS = "num-participants"
THRESHOLD = "threshold"
NEIGHBOURS = "neighbours"

# Stage 1 and its routing.
C_PUBLIC_KEY = "c-public-key"  # X25519, agrees the keys that encrypt shares
S_PUBLIC_KEY = "s-public-key"  # X25519, agrees the pairwise mask seeds
SITE_ID = "site-id"  # the site's name in the federation roster
KEY_SIGNATURE = "key-signature"  # over key_statement(...), by the site's identity key
KEY_OWNERS = "key-owners"
C_PUBLIC_KEYS = "c-public-keys"
S_PUBLIC_KEYS = "s-public-keys"
KEY_SITE_IDS = "key-site-ids"
KEY_SIGNATURES = "key-signatures"

# Stage 2 and its routing.
RECEIVERS = "receivers"
SENDERS = "senders"
CIPHERTEXTS = "ciphertexts"

# Stage 3b (consistency): the survivor set U3 and each survivor's signature over it.
SURVIVOR_SET = "survivor-set"
SURVIVOR_SET_SIGNATURE = "survivor-set-signature"
SIGNER_INDICES = "signer-indices"
SIGNER_SITE_IDS = "signer-site-ids"
SIGNER_SIGNATURES = "signer-signatures"

# Stage 3b→4 request and stage 4 reply.
SURVIVORS = "survivors"
DROPPED = "dropped"
B_OWNERS = "b-owners"
B_SHARES = "b-shares"
S_OWNERS = "s-owners"
S_SHARES = "s-shares"

_SCALARS = (bytes, int, float, str, bool)

PROTOCOL_VERSION = b"medsilo-secagg-v2"  # v2: signed keys and the consistency round


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _int(value: int) -> bytes:
    return value.to_bytes(4, "big")


def key_statement(session: bytes, index: int, num_participants: int, threshold: int,
                  site_id: str, c_public_key: bytes, s_public_key: bytes) -> bytes:
    """What a site signs in stage 1: its keys bound to this round's parameters and its name.

    A receiving site checks it against ITS OWN session, n and t: a server that tells sites
    different round parameters, or substitutes a key, makes the signature fail.
    """
    return _framed(PROTOCOL_VERSION, b"advertise-keys", session, _int(index),
                   _int(num_participants), _int(threshold), site_id.encode("utf-8"),
                   c_public_key, s_public_key)


def survivor_set_statement(session: bytes, index: int, survivor_set: list[int]) -> bytes:
    """What a survivor signs in stage 3b: the one survivor set U3 it accepts for this round."""
    return _framed(PROTOCOL_VERSION, b"survivor-set", session, _int(index),
                   b"".join(_int(j) for j in sorted(survivor_set)))


def check_record_values(message: Mapping[str, Any], what: str) -> None:
    """Raise ``TypeError`` unless every value fits a Flower ConfigRecord (see module docstring).

    Used by the tests and available to the driver; the stage functions only ever build such
    messages.
    """
    for key, value in message.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: key {key!r} is not a str")
        if isinstance(value, _SCALARS):
            continue
        if isinstance(value, list):
            kinds = {type(item) for item in value}
            if len(kinds) <= 1 and all(isinstance(item, _SCALARS) for item in value):
                continue
        raise TypeError(f"{what}: value of {key!r} is {type(value).__name__}, not a "
                        "ConfigRecord value (bytes/int/float/str/bool or a list of one of these)")


def _fail(message: str, participant: int | None) -> SecAggProtocolError:
    return SecAggProtocolError(message, participant)


def check_envelope(message: Mapping[str, Any], session: bytes, index: int, what: str) -> None:
    """Reject a message of another session (a replay) or meant for/from another participant."""
    if not isinstance(message, Mapping):
        raise _fail(f"{what}: expected a dict of ConfigRecord values, got "
                    f"{type(message).__name__}", index)
    got_session = message.get(SESSION)
    if got_session != session:
        raise _fail(f"{what}: session id does not match this round's (a message from another "
                    "round, or for another session)", index)
    got_index = message.get(INDEX)
    if got_index != index or isinstance(got_index, bool):
        raise _fail(f"{what}: message is for/from participant {got_index!r}, expected {index}",
                    index)


def get_int(message: Mapping[str, Any], key: str, what: str, participant: int | None) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(f"{what}: '{key}' must be an int, got {type(value).__name__}", participant)
    return value


def get_bytes(message: Mapping[str, Any], key: str, what: str,
              participant: int | None) -> bytes:
    value = message.get(key)
    if not isinstance(value, bytes):
        raise _fail(f"{what}: '{key}' must be bytes, got {type(value).__name__}", participant)
    return value


def get_int_list(message: Mapping[str, Any], key: str, what: str,
                 participant: int | None) -> list[int]:
    value = message.get(key)
    if not isinstance(value, list | tuple) or not all(
            isinstance(item, int) and not isinstance(item, bool) for item in value):
        raise _fail(f"{what}: '{key}' must be a list of ints", participant)
    if len(set(value)) != len(value):
        raise _fail(f"{what}: '{key}' lists a participant twice: {list(value)}", participant)
    return list(value)


def get_str_list(message: Mapping[str, Any], key: str, what: str, participant: int | None,
                 length: int | None = None) -> list[str]:
    value = message.get(key)
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise _fail(f"{what}: '{key}' must be a list of str", participant)
    if length is not None and len(value) != length:
        raise _fail(f"{what}: '{key}' has {len(value)} entries, expected {length}", participant)
    return list(value)


def get_str(message: Mapping[str, Any], key: str, what: str, participant: int | None) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(f"{what}: '{key}' must be a non-empty str, got {type(value).__name__}",
                    participant)
    return value


def get_bytes_list(message: Mapping[str, Any], key: str, what: str, participant: int | None,
                   length: int | None = None) -> list[bytes]:
    value = message.get(key)
    if not isinstance(value, list | tuple) or not all(isinstance(item, bytes) for item in value):
        raise _fail(f"{what}: '{key}' must be a list of bytes", participant)
    if length is not None and len(value) != length:
        raise _fail(f"{what}: '{key}' has {len(value)} entries, expected {length}", participant)
    return list(value)
