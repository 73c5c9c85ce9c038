"""Provision a federation: the certificates and keys a coordinator and its hospitals need.

``python -m server.provision OUT --site hospital_a --site hospital_b [--dns link.example.org]
[--ip 10.0.0.5] [--address link.example.org:9093] [--force]`` writes::

    OUT/ca/ca.crt, ca.key                the federation CA (ca.key: keep it offline)
    OUT/superlink/ca.crt, server.crt, server.key
                                         the SuperLink's TLS certificate, signed by the CA,
                                         SANs: every --dns and --ip (default localhost, 127.0.0.1)
    OUT/superlink/connection.toml        the `[superlink.medsilo]` table for $FLWR_HOME/config.toml
    OUT/sites/<site>/ca.crt              the bundle handed to one hospital: the CA (to verify the
    OUT/sites/<site>/supernode.key, .pub SuperLink and the roster), its ECDSA P-384 key pair
    OUT/sites/<site>/roster.json         (Flower's SuperNode authentication, and its identity in
    OUT/sites/<site>/site.toml           secure aggregation), the federation roster, and a site
                                         configuration template

Private keys are written 0600. Nothing that exists is overwritten without ``--force``: running
the command again adds what is missing (a new hospital) and keeps every existing key, so a
re-run never invalidates a registered SuperNode. ``--force`` regenerates the CA, the SuperLink
certificate and the named sites' keys (every site must then be registered again).

The roster (``roster.json``: every provisioned site's public key, signed by the CA; see
privacy/secagg/identity.py) lists all sites under ``OUT/sites/``, named on this run or not, and
is re-signed and rewritten into every bundle on each run. When a site is added (or a key
regenerated) EVERY site must get the new ``roster.json``: a site with the old one refuses
secure aggregation with the new site ("not in the federation roster"). Whoever holds
``ca/ca.key`` decides who is in the federation; it must not be the operator of the server
(SuperLink), or that operator could sign a roster of keys of its own and impersonate sites.

Key types follow Flower 1.41: SuperNode authentication takes an EC key on a NIST curve, the
private key in OpenSSH format (``--auth-supernode-private-key``), the public key in OpenSSH
format (``flwr supernode register``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.files import write_atomically
from privacy.secagg.identity import Roster

CURVE = ec.SECP384R1()  # P-384: Flower's SuperNode authentication and our TLS keys
CONNECTION_NAME = "medsilo"
DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1",)
DEFAULT_ADDRESS = "127.0.0.1:9093"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ProvisionError(ValueError):
    """A provisioning request that would break or silently change an existing federation."""


@dataclass
class Provisioned:
    """What a provisioning run wrote (``created``) and left as it was (``kept``)."""

    out_dir: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.out_dir / "ca" / "ca.crt"

    @property
    def superlink_dir(self) -> Path:
        return self.out_dir / "superlink"

    def site_dir(self, site: str) -> Path:
        return self.out_dir / "sites" / site


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """A private key is 0600 from its first byte (never readable by others)."""
    if path.exists() and not force:
        raise ProvisionError(f"{path} exists; pass --force to overwrite it")
    write_atomically(path, data, mode=0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medsilo federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("medsilo federation CA")).issuer_name(_name("medsilo federation CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _sans(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as err:
            raise ProvisionError(f"--ip {ip!r} is not an IP address") from err
    if not names:
        raise ProvisionError("the SuperLink certificate needs at least one --dns or --ip name")
    return names


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
    dns_names: Sequence[str], ip_addresses: Sequence[str], days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    start, end = _validity(days)
    common_name = (list(dns_names) + list(ip_addresses))[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        # TLS clients check the host they dial against the SANs, never the common name.
        .add_extension(x509.SubjectAlternativeName(_sans(dns_names, ip_addresses)),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def server_cert_names(cert_path: Path) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) in a certificate's SANs."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (set(sans.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)})


def site_config_template(site: str, task: str, bundle: str = "/etc/medsilo") -> str:
    """The hospital's own configuration (client/site.py reads it). Its values win over the
    server's; only the hospital edits it, so provisioning never overwrites it. ``bundle``: where
    the hospital keeps this bundle's files (edit the paths if it moves them)."""
    return f"""\
# medsilo site configuration for {site}: this hospital's own settings. They win over
# anything the coordinating server sends. Start the SuperNode with
#   --node-config 'site-config="/path/to/this/site.toml"'
site_id = "{site}"             # the name the coordinator's report uses for this hospital
task = "{task}"                # the clinical task this site's data is for; runs of another task
                               # are refused (images | vitals | notes | tabular)
data_path = "/data/medsilo/{site}"       # this site's data folder (README: "Your hospitals' files")
state_dir = "/var/lib/medsilo/{site}"    # privacy ledger and egress log (egress.jsonl) live here
device = "auto"                # auto | cpu | cuda | mps
threads = 0                    # torch threads; 0 leaves torch's default
max_epsilon = 8.0              # this site's privacy budget: a DP round that would exceed it is
                               # declined (remove the line for no budget)
# delta = 1e-5                 # this site's delta (default: min(1e-5, ~1/(10 * training records)))

# This site's privacy policy (client/policy.py): a run that asks for less is refused, with the
# reason in the coordinator's report. The site plans its own noise from max_epsilon.
require_dp = true              # runs without DP-SGD are refused (the default in deployment)
# min_noise_multiplier = 0.8   # never train with a smaller sigma
# max_grad_norm_range = [0.1, 10.0]   # per-example clipping bounds C this site accepts
# allowed_models = ["mlp", "logreg"]  # runs of other models are refused (default: any)

# Secure aggregation: this site's identity (signs its keys; checks everyone else's against the
# roster the federation CA signed). Replace a roster with the newest one whenever you get it.
identity_key = "{bundle}/supernode.key"
roster = "{bundle}/roster.json"
ca_cert = "{bundle}/ca.crt"
# secagg_min_threshold = 3     # never share secrets with a smaller Shamir threshold (the
                               # default floor is a majority of this site's neighbourhood)

# Only app versions this hospital has reviewed may touch its data. After review, add the
# release's hash: `python -m client.approval hash /path/to/release/checkout`.
require_approval = true
approved_app_hashes = []
"""


def _connection_toml(address: str, ca_cert: Path) -> str:
    return (f"# Add to $FLWR_HOME/config.toml (default ~/.flwr/config.toml) on the machine that "
            f"runs `flwr`.\n[superlink.{CONNECTION_NAME}]\naddress = \"{address}\"\n"
            f"root-certificates = \"{ca_cert.resolve()}\"\n")


def provision(
    out_dir: Path,
    sites: Sequence[str],
    *,
    dns_names: Sequence[str] = DEFAULT_DNS,
    ip_addresses: Sequence[str] = DEFAULT_IPS,
    address: str = DEFAULT_ADDRESS,
    task: str = "images",
    days: int = 365,
    force: bool = False,
    inside_app: bool = False,
) -> Provisioned:
    """Create (or complete) a federation's CA, SuperLink certificate and hospital bundles.
    ``inside_app``: write them inside a Flower app's folder anyway (refused by default)."""
    app_root = _enclosing_app(Path(out_dir))
    if app_root is not None and not inside_app:
        raise ProvisionError(
            f"{out_dir} is inside the Flower app at {app_root}: private keys there are one "
            "`git add` or backup of the code away from leaking (the app's FAB excludes them, "
            "the checkout does not); provision outside it, e.g. /etc/medsilo or "
            "~/medsilo-federation (or pass --inside-app)")
    for site in sites:
        if not SITE_NAME.match(site):
            raise ProvisionError(f"site name {site!r} must be 1-64 letters, digits, '_', '-' or "
                                 "'.', starting with a letter or digit")
    if len(set(sites)) != len(sites):
        raise ProvisionError(f"site names must be distinct, got {list(sites)}")
    if days < 1:
        raise ProvisionError(f"--days must be >= 1, got {days}")
    _sans(dns_names, ip_addresses)  # a bad host name fails before anything is written
    result = Provisioned(Path(out_dir))
    ca_key_path, ca_cert_path = result.out_dir / "ca" / "ca.key", result.ca_cert

    if not force and not ca_key_path.exists() and ca_cert_path.exists():
        raise ProvisionError(f"{ca_cert_path} exists but its key {ca_key_path} is missing; "
                             "restore the key or pass --force to start a new federation")
    if force or not ca_key_path.exists():
        ca_key, ca_cert = _make_ca(days)
        _write(ca_key_path, _pem_key(ca_key), private=True, force=force)
        _write(ca_cert_path, _pem_cert(ca_cert), private=False, force=True)
        result.created += [ca_key_path, ca_cert_path]
        force_dependents = True  # a new CA invalidates every certificate it did not sign
    else:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not ca_cert_path.exists():
            raise ProvisionError(f"{ca_key_path} exists but {ca_cert_path} is missing; restore "
                                 "it or pass --force to start a new federation")
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
            ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers()):
            raise ProvisionError(f"{ca_cert_path} was not made from {ca_key_path}")
        result.kept += [ca_key_path, ca_cert_path]
        force_dependents = False

    link = result.superlink_dir
    server_key_path, server_cert_path = link / "server.key", link / "server.crt"
    if force or force_dependents or not server_key_path.exists():
        key, cert = _make_server_cert(ca_key, ca_cert, dns_names, ip_addresses, days)
        _write(server_key_path, _pem_key(key), private=True, force=True)
        _write(server_cert_path, _pem_cert(cert), private=False, force=True)
        result.created += [server_key_path, server_cert_path]
    else:
        wanted = (set(dns_names), {str(ipaddress.ip_address(ip)) for ip in ip_addresses})
        if server_cert_names(server_cert_path) != wanted:
            have = server_cert_names(server_cert_path)
            raise ProvisionError(
                f"{server_cert_path} names DNS {sorted(have[0])} IP {sorted(have[1])}, not the "
                f"requested DNS {sorted(wanted[0])} IP {sorted(wanted[1])}; pass --force to "
                "issue a new SuperLink certificate")
        result.kept += [server_key_path, server_cert_path]
    _write(link / "ca.crt", _pem_cert(ca_cert), private=False, force=True)
    _write(link / "connection.toml", _connection_toml(address, link / "ca.crt").encode(),
           private=False, force=True)

    for site in sites:
        bundle = result.site_dir(site)
        key_path, pub_path = bundle / "supernode.key", bundle / "supernode.pub"
        if force or not key_path.exists():
            key = ec.generate_private_key(CURVE)
            _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()),
                   private=True, force=True)
            result.created.append(key_path)
        else:
            key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
            result.kept.append(key_path)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write(pub_path, public + f" {site}\n".encode(), private=False, force=True)
        _write(bundle / "ca.crt", _pem_cert(ca_cert), private=False, force=True)
        template = bundle / "site.toml"
        if not template.exists():  # the hospital's own file: never overwritten, not even --force
            _write(template, site_config_template(site, task, str(bundle.resolve())).encode(),
                   private=False, force=False)
            result.created.append(template)
    _write_rosters(result, ca_key)
    _write_startup_kits(result, address)
    return result


def _script(path: Path, lines: Sequence[str]) -> None:
    """A start-up script (0755), rewritten on every run so it names the current files."""
    text = "#!/bin/sh\n" + "\n".join(lines) + "\n"
    write_atomically(path, text.encode(), mode=0o755)


def _write_startup_kits(result: Provisioned, address: str) -> None:
    """The exact commands, with this federation's absolute paths: the coordinator's
    start-superlink.sh and register-sites.sh, each hospital's start-supernode.sh."""
    link = result.superlink_dir.resolve()
    port = address.rsplit(":", 1)[-1]
    _script(link / "start-superlink.sh", [
        "# The SuperLink: TLS with this federation's certificate, only registered SuperNodes.",
        "set -eu",
        "exec flower-superlink \\",
        f'    --ssl-ca-certfile "{link}/ca.crt" \\',
        f'    --ssl-certfile "{link}/server.crt" \\',
        f'    --ssl-keyfile "{link}/server.key" \\',
        "    --enable-supernode-auth \\",
        f"    --host 0.0.0.0 --port {port} \\",
        f'    --database "{link}/state.db" \\',
        "    --disable-runtime-dependency-installation",
    ])
    sites_dir = result.out_dir.resolve() / "sites"
    sites = sorted(b.name for b in sites_dir.iterdir() if (b / "supernode.pub").is_file())
    _script(link / "register-sites.sh", [
        "# Register every hospital's public key with the SuperLink (after start-superlink.sh;",
        f"# `flwr` reads the [superlink.{CONNECTION_NAME}] table of connection.toml).",
        "set -eu",
        *(f'flwr supernode register "{sites_dir / site}/supernode.pub" {CONNECTION_NAME}'
          for site in sites),
        f"flwr supernode list {CONNECTION_NAME}",
    ])
    for site in sites:
        bundle = sites_dir / site
        _script(bundle / "start-supernode.sh", [
            f"# {site}'s SuperNode: TLS to the SuperLink, authenticated with this bundle's",
            "# key, this hospital's own settings (site.toml: data, state_dir, policy).",
            "set -eu",
            "exec flower-supernode \\",
            f"    --superlink {address} \\",
            f'    --root-certificates "{bundle}/ca.crt" \\',
            f'    --auth-supernode-private-key "{bundle}/supernode.key" \\',
            "    --port 9094 \\",
            f"    --node-config 'site-config=\"{bundle}/site.toml\"'",
        ])


def _write_rosters(result: Provisioned, ca_key: ec.EllipticCurvePrivateKey) -> None:
    """Sign the roster of every site bundle under OUT/sites and put it in each bundle."""
    keys = {}
    sites_dir = result.out_dir / "sites"
    for bundle in sorted(sites_dir.iterdir()) if sites_dir.is_dir() else ():
        key_path = bundle / "supernode.key"
        if bundle.is_dir() and key_path.is_file():
            keys[bundle.name] = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    roster = Roster.of(keys)
    data = None
    for site in keys:
        path = result.site_dir(site) / "roster.json"
        if data is None:
            data = roster.write(path, ca_key)
        else:
            _write(path, data, private=False, force=True)


def _enclosing_app(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` whose pyproject.toml declares a Flower app."""
    for folder in (path.resolve(), *path.resolve().parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text(errors="replace"):
            return folder
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.provision",
        description="Create a federation CA, the SuperLink's TLS certificate and one bundle per "
                    "hospital (CA certificate, SuperNode key pair, site configuration template).")
    parser.add_argument("out_dir", type=Path, help="where to write ca/, superlink/, sites/")
    parser.add_argument("--site", action="append", default=[], metavar="NAME",
                        help="a hospital to provision (repeat for each)")
    parser.add_argument("--dns", action="append", metavar="NAME",
                        help=f"a DNS name of the SuperLink (repeatable; default {DEFAULT_DNS})")
    parser.add_argument("--ip", action="append", metavar="ADDR",
                        help=f"an IP address of the SuperLink (repeatable; default {DEFAULT_IPS})")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="host:port the coordinator's `flwr` CLI dials (connection.toml)")
    parser.add_argument("--task", default="images", help="the task in the site templates")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days")
    parser.add_argument("--force", action="store_true",
                        help="regenerate the CA, the SuperLink certificate and the named sites' "
                             "keys (sites must be registered again)")
    parser.add_argument("--inside-app", action="store_true",
                        help="write into a folder inside a Flower app's checkout anyway "
                             "(refused by default: keys there end up in its version control)")
    args = parser.parse_args(argv)
    try:
        result = provision(
            args.out_dir, args.site, dns_names=args.dns or DEFAULT_DNS,
            ip_addresses=args.ip or DEFAULT_IPS, address=args.address, task=args.task,
            days=args.days, force=args.force, inside_app=args.inside_app)
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in result.created:
        print(f"created {path}")
    for path in result.kept:
        print(f"kept    {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
