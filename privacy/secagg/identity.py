"""Who is who in a SecAgg round: provisioned site identities and the CA-signed roster.

Against a server that only follows the protocol, fresh X25519 keys per round are enough. Against
a server that deviates (Bonawitz et al. 2017, §6 "active adversary") two things are needed:

- every stage-1 public key is signed by the site that drew it, with a long-term key the server
  does not control, so the server cannot substitute keys (and sit in the middle of every share);
- every site signs the survivor set U3 it is shown (the consistency round), so the server cannot
  show different sites different survivor sets.

A site's long-term key is the ECDSA P-384 key ``python -m server.provision`` writes into its
bundle (``supernode.key``: the same key Flower's SuperNode authentication uses). Sites learn
each other's public keys from the **roster**: ``{site_id: public key}`` as canonical JSON, signed
by the federation CA. The CA key is kept offline by whoever provisions the federation; if the
server operator held it, it could sign a roster of its own keys and the signatures would prove
nothing.

``roster.json``::

    {"format": "medsilo-roster-v1",
     "sites": {"hospital_a": "<base64 DER SubjectPublicKeyInfo>", ...},
     "signature": "<base64 ECDSA-SHA384 by the CA over canonical JSON of format + sites>"}

Only ``cryptography`` is used; signatures are DER-encoded ECDSA over SHA-384.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.files import write_atomically
from privacy.secagg.errors import SecAggProtocolError

CURVE = ec.SECP384R1()
ROSTER_FORMAT = "medsilo-roster-v1"
_ROSTER_DOMAIN = b"medsilo-roster-v1\n"  # a roster signature never verifies as anything else
SIGNATURE_MAX_BYTES = 104  # DER ECDSA P-384: 2 x 48-byte integers + framing


class IdentityError(ValueError):
    """A key, roster or CA file that cannot be used; the message names the file."""


# -- keys and signatures ----------------------------------------------------------------------

def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """A site's P-384 private key from ``path``: OpenSSH (what provisioning writes) or PEM."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise IdentityError(f"identity key {path} cannot be read: {error}") from error
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as error:
        raise IdentityError(f"identity key {path} is not an unencrypted OpenSSH or PEM private "
                            f"key: {error}") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise IdentityError(f"identity key {path} must be an ECDSA P-384 (secp384r1) key")
    return key


def public_key_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA-SHA384 signature (DER) of ``message``."""
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


# Signatures that verified, remembered by (public key DER, signature, message), least recently
# used dropped first. Every site of a round checks the same signatures (each peer's signed keys,
# then every survivor's signature on U3): 2n(n-1) P-384 verifications per round (~0.3 ms each)
# where a simulation actor serves many sites in one process. ECDSA verification is a
# deterministic function of these three byte strings, so a hit answers exactly what verifying
# again would; only successes are kept (a failure raises, and lru_cache never keeps an
# exception: a bad signature is checked, and refused, every time), and a changed key,
# signature, session, index, n, t or survivor set is another entry. Public values only.
# A deployed site (one process per message) gains nothing and loses nothing.
_VERIFIED_MAX = 8192  # ~2.5 MB of entries; 2n per round in a process serving every site


def _check_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise :class:`InvalidSignature` unless ``signature`` is the ECDSA-SHA384 signature of
    ``message`` by the P-384 key whose DER SubjectPublicKeyInfo is ``public_key``."""
    key = cast(ec.EllipticCurvePublicKey, serialization.load_der_public_key(public_key))
    key.verify(signature, message, ec.ECDSA(hashes.SHA384()))


_verified = lru_cache(maxsize=_VERIFIED_MAX)(_check_signature)
_refused = 0  # failed checks since the cache was last emptied or resized
_REFUSED_LOCK = threading.Lock()


def verify(public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s ECDSA-SHA384 signature of ``message``
    (answered from the bounded cache above when this exact triple verified before)."""
    global _refused
    if not isinstance(signature, bytes) or not 0 < len(signature) <= SIGNATURE_MAX_BYTES:
        return False
    try:
        _verified(public_key_der(public_key), signature, bytes(message))
    except InvalidSignature:
        with _REFUSED_LOCK:
            _refused += 1
        return False
    return True


def verification_counts() -> dict[str, int]:
    """How this process answered :func:`verify` since the cache was last emptied or resized:
    ``verified`` (a P-384 check that passed), ``remembered`` (the same triple passed before)
    and ``refused`` (a check that failed)."""
    info = _verified.cache_info()
    with _REFUSED_LOCK:
        return {"verified": info.misses - _refused, "remembered": info.hits,
                "refused": _refused}


def forget_verified_signatures() -> None:
    """Empty the cache (tests and benchmarks that time the verifications themselves)."""
    global _refused
    with _REFUSED_LOCK:
        _verified.cache_clear()
        _refused = 0


def remember_verified_signatures(entries: int) -> int:
    """Keep at most ``entries`` verified signatures (0: check every time, as a deployed site,
    one process per message, does); returns the previous limit. Starts an empty cache."""
    global _verified, _refused, _VERIFIED_MAX
    with _REFUSED_LOCK:
        previous, _VERIFIED_MAX = _VERIFIED_MAX, max(0, int(entries))
        _verified = lru_cache(maxsize=_VERIFIED_MAX)(_check_signature)
        _refused = 0
    return previous


# -- the roster -------------------------------------------------------------------------------

def _canonical(sites: Mapping[str, str]) -> bytes:
    body = {"format": ROSTER_FORMAT, "sites": dict(sorted(sites.items()))}
    return _ROSTER_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=True).encode()


@lru_cache(maxsize=4096)
def _load_public_key(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise ValueError("not a P-384 public key")
    return key


@dataclass(frozen=True)
class Roster:
    """The federation's site identities: ``site_id → P-384 public key`` (DER, loaded lazily so a
    1000-site roster costs one signature check, not 1000 key parses)."""

    sites: Mapping[str, bytes]
    source: str = "roster"

    @classmethod
    def of(cls, public_keys: Mapping[str, ec.EllipticCurvePublicKey
                                     | ec.EllipticCurvePrivateKey]) -> Roster:
        return cls({site: public_key_der(key) for site, key in public_keys.items()})

    def __contains__(self, site_id: object) -> bool:
        return site_id in self.sites

    def public_key(self, site_id: str) -> ec.EllipticCurvePublicKey:
        """The roster key of ``site_id``; SecAggProtocolError if the site is not in the roster."""
        if not isinstance(site_id, str) or site_id not in self.sites:
            raise SecAggProtocolError(f"site {site_id!r} is not in the federation roster "
                                      f"({self.source})")
        return _load_public_key(self.sites[site_id])

    def signed(self, ca_key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
        """The ``roster.json`` document: the entries and the CA's signature over them."""
        encoded = {site: base64.b64encode(der).decode() for site, der in self.sites.items()}
        return {"format": ROSTER_FORMAT, "sites": dict(sorted(encoded.items())),
                "signature": base64.b64encode(sign(ca_key, _canonical(encoded))).decode()}

    def write(self, path: str | os.PathLike[str], ca_key: ec.EllipticCurvePrivateKey) -> bytes:
        """The signed roster as bytes, written to ``path`` (readable by all: it is public)."""
        data = (json.dumps(self.signed(ca_key), indent=1, sort_keys=True) + "\n").encode()
        write_atomically(path, data, mode=0o644)
        return data

    @classmethod
    def load(cls, path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str]) -> Roster:
        """Read ``roster.json`` and check the CA's signature with the certificate at
        ``ca_cert_path``; IdentityError naming the file if anything is off."""
        path, ca_cert_path = Path(path), Path(ca_cert_path)
        return _load_roster(str(path), str(ca_cert_path), *_stamp(path), *_stamp(ca_cert_path))


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load_roster(path_name: str, ca_name: str, *_stamps: int) -> Roster:
    # cached per file version: a simulation actor serves many sites from the same roster
    path, ca_cert_path = Path(path_name), Path(ca_name)
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    except (OSError, ValueError) as error:
        raise IdentityError(f"CA certificate {ca_cert_path} cannot be read as PEM: {error}") \
            from error
    ca_key = ca_cert.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"CA certificate {ca_cert_path} does not hold an EC key")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        encoded = document["sites"]
        signature = base64.b64decode(document["signature"], validate=True)
        if document.get("format") != ROSTER_FORMAT or not isinstance(encoded, dict):
            raise ValueError(f"format must be {ROSTER_FORMAT!r} with a 'sites' object")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IdentityError(f"roster {path} cannot be read: {error}") from error
    if not verify(ca_key, signature, _canonical(encoded)):
        raise IdentityError(f"roster {path} is not signed by the federation CA in "
                            f"{ca_cert_path} (altered, or from another federation)")
    try:
        sites = {str(site): base64.b64decode(der, validate=True)
                 for site, der in encoded.items()}
    except ValueError as error:
        raise IdentityError(f"roster {path}: a public key is not base64: {error}") from error
    return Roster(sites, source=str(path))


# -- a site's identity --------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteIdentity:
    """What a site brings to a SecAgg round besides its data: its name, its signing key, the
    roster it checks everyone else against, and its own threshold floor (site.toml)."""

    site_id: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    roster: Roster
    min_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.site_id not in self.roster:
            raise IdentityError(f"site {self.site_id!r} is not in its own roster "
                                f"({self.roster.source}); provision it, or use the roster "
                                "re-signed after it was added")
        if self.roster.sites[self.site_id] != public_key_der(self.key):
            raise IdentityError(f"the identity key of site {self.site_id!r} is not the one the "
                                f"roster ({self.roster.source}) lists for it")

    def sign(self, message: bytes) -> bytes:
        return sign(self.key, message)

    @classmethod
    def load(cls, site_id: str, key_path: str | os.PathLike[str],
             roster_path: str | os.PathLike[str], ca_cert_path: str | os.PathLike[str],
             min_threshold: int | None = None) -> SiteIdentity:
        return cls(site_id, load_private_key(key_path), Roster.load(roster_path, ca_cert_path),
                   min_threshold)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def test_identities(site_ids: Iterable[str], *, min_threshold: int | None = None
                    ) -> dict[str, SiteIdentity]:
    """Fresh identities and a roster for ``site_ids``, in memory (tests, loopback, benchmark)."""
    keys = {site: generate_key() for site in site_ids}
    roster = Roster.of(keys)
    return {site: SiteIdentity(site, key, roster, min_threshold) for site, key in keys.items()}


test_identities.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def write_ephemeral_federation(folder: str | os.PathLike[str], site_ids: Iterable[str]
                               ) -> dict[str, dict[str, str]]:
    """A throw-away CA, one P-384 key per site (0600) and the CA-signed roster under ``folder``
    (simulation only: the CA key is not kept). Returns per site the node-config entries
    ``{"identity-key", "roster", "ca-cert"}``.

    Safe when several processes call it at once for the same folder: everything is written to a
    temporary folder renamed into place; whoever loses the race uses the winner's files. An
    existing folder listing every site is reused as it is.
    """
    import datetime as dt
    import shutil
    import tempfile

    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    sites = sorted(set(site_ids))

    def entries(root: Path) -> dict[str, dict[str, str]]:
        return {site: {"identity-key": str(root / "keys" / f"{site}.key"),
                       "roster": str(root / "roster.json"), "ca-cert": str(root / "ca.crt")}
                for site in sites}

    if (folder / "roster.json").is_file():
        listed = json.loads((folder / "roster.json").read_text(encoding="utf-8"))["sites"]
        if set(sites) <= set(listed):
            return entries(folder)
        raise IdentityError(f"{folder} holds a roster without sites "
                            f"{sorted(set(sites) - set(listed))[:5]}; remove the folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        ca_key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medsilo simulation CA")])
        now = dt.datetime.now(dt.UTC)
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(ca_key, hashes.SHA384()))
        (staging / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (staging / "keys").mkdir()
        public = {}
        for site in sites:
            key = generate_key()
            public[site] = key
            fd = os.open(staging / "keys" / f"{site}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        document = Roster.of(public).signed(ca_key)
        (staging / "roster.json").write_text(json.dumps(document, sort_keys=True) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another process won the race (or the folder exists): use its files
            shutil.rmtree(staging, ignore_errors=True)
            if not (folder / "roster.json").is_file():
                raise
            return write_ephemeral_federation(folder, sites)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entries(folder)
