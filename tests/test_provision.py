"""Provisioning: a federation CA, the SuperLink's TLS certificate, one bundle per hospital."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key

from client.site import SiteSettings
from server.provision import ProvisionError, provision, server_cert_names
from tests.helpers import ROOT

SITES = ["hospital_a", "hospital_b"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    provision(out, SITES, dns_names=["localhost", "link.example.org"],
              ip_addresses=["127.0.0.1", "10.0.0.5"], address="link.example.org:9093")
    return out


def _private_keys(out):
    return [out / "ca" / "ca.key", out / "superlink" / "server.key",
            *(out / "sites" / s / "supernode.key" for s in SITES)]


def test_private_keys_are_readable_by_their_owner_only(federation):
    for key in _private_keys(federation):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((federation / "ca" / "ca.crt").stat().st_mode) == 0o644


def test_the_superlink_certificate_is_signed_by_the_ca_and_names_its_hosts(federation):
    ca = x509.load_pem_x509_certificate((federation / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate(
        (federation / "superlink" / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert server_cert_names(federation / "superlink" / "server.crt") == (
        {"localhost", "link.example.org"}, {"127.0.0.1", "10.0.0.5"})
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(
        (federation / "superlink" / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_each_hospital_bundle_has_what_its_supernode_needs(federation):
    for site in SITES:
        bundle = federation / "sites" / site
        assert (bundle / "ca.crt").read_bytes() == (federation / "ca" / "ca.crt").read_bytes()
        # the formats Flower 1.41 reads: OpenSSH private key, OpenSSH public key, P-384
        key = serialization.load_ssh_private_key((bundle / "supernode.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert try_load_public_key(bundle / "supernode.pub")  # what `flwr supernode register` reads
        settings = SiteSettings.from_file(bundle / "site.toml")
        assert settings.site_id == site and settings.require_approval
        assert settings.approved_app_hashes == () and settings.max_epsilon == 8.0
    keys = {(federation / "sites" / s / "supernode.pub").read_text().split()[1] for s in SITES}
    assert len(keys) == len(SITES)  # one key pair per hospital


def test_the_connection_table_is_ready_for_the_flwr_cli(federation):
    table = tomllib.loads((federation / "superlink" / "connection.toml").read_text())
    conn = table["superlink"]["medsilo"]
    assert conn["address"] == "link.example.org:9093"
    assert conn["root-certificates"] == str((federation / "superlink" / "ca.crt").resolve())


def test_rerunning_keeps_every_key_and_adds_a_new_hospital(federation):
    before = {p: p.read_bytes() for p in _private_keys(federation)}
    (federation / "sites" / "hospital_a" / "site.toml").write_text('data_path = "/edited"\n')
    result = provision(federation, [*SITES, "hospital_c"],
                       dns_names=["localhost", "link.example.org"],
                       ip_addresses=["127.0.0.1", "10.0.0.5"])
    assert {p: p.read_bytes() for p in before} == before
    assert (federation / "sites" / "hospital_c" / "supernode.key").is_file()
    assert set(result.created) == {federation / "sites" / "hospital_c" / "supernode.key",
                                   federation / "sites" / "hospital_c" / "site.toml"}
    # the hospital's own configuration is never overwritten
    assert (federation / "sites" / "hospital_a" / "site.toml").read_text() == \
        'data_path = "/edited"\n'


def test_a_changed_host_list_needs_force(tmp_path):
    provision(tmp_path, ["h1"])
    with pytest.raises(ProvisionError, match="pass --force to issue a new SuperLink"):
        provision(tmp_path, ["h1"], dns_names=["other.example.org"])
    old_key = (tmp_path / "sites" / "h1" / "supernode.key").read_bytes()
    provision(tmp_path, ["h1"], dns_names=["other.example.org"], force=True)
    assert server_cert_names(tmp_path / "superlink" / "server.crt")[0] == {"other.example.org"}
    assert (tmp_path / "sites" / "h1" / "supernode.key").read_bytes() != old_key
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "sites" / "h1" / "supernode.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize(("sites", "kwargs", "message"), [
    (["a b"], {}, "site name 'a b'"),
    (["h1", "h1"], {}, "must be distinct"),
    (["h1"], {"ip_addresses": ["not-an-ip"]}, "is not an IP address"),
    (["h1"], {"days": 0}, "--days must be >= 1"),
])
def test_bad_requests_are_refused_with_a_clear_message(tmp_path, sites, kwargs, message):
    with pytest.raises(ProvisionError, match=message):
        provision(tmp_path, sites, **kwargs)


def test_a_ca_certificate_without_its_key_is_not_silently_replaced(tmp_path):
    provision(tmp_path, ["h1"])
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(ProvisionError, match="its key .* is missing"):
        provision(tmp_path, ["h1"])


def test_the_command_line(tmp_path):
    args = [sys.executable, "-m", "server.provision", str(tmp_path), "--site", "h1",
            "--dns", "localhost", "--ip", "127.0.0.1"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"created {tmp_path / 'sites' / 'h1' / 'supernode.key'}" in first.stdout
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "created" not in again.stdout
    bad = subprocess.run([*args[:-4], "--ip", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "is not an IP address" in bad.stderr


def _flags(script: Path) -> set[str]:
    return set(re.findall(r"(--[a-z-]+)", script.read_text()))


def test_the_startup_kits_name_this_federations_files(tmp_path):
    provision(tmp_path / "fed", ["hospital_a", "hospital_b"])
    link, site = tmp_path / "fed" / "superlink", tmp_path / "fed" / "sites" / "hospital_a"
    kit = {"superlink": link / "start-superlink.sh", "register": link / "register-sites.sh",
           "supernode": site / "start-supernode.sh"}
    for script in kit.values():
        assert script.stat().st_mode & 0o777 == 0o755
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
        for path in re.findall(r'"(/[^"]+\.(?:crt|key|pub|toml))', script.read_text()):
            assert Path(path).is_file(), (script.name, path)  # every file it names exists
    supernode = kit["supernode"].read_text()
    assert f'site-config="{site.resolve()}/site.toml"' in supernode
    assert "--superlink 127.0.0.1:9093" in supernode
    register = kit["register"].read_text()
    assert register.count("flwr supernode register") == 2 and "hospital_b/supernode.pub" in register


@pytest.mark.slow
def test_the_startup_kits_use_only_flags_the_pinned_flower_knows(tmp_path):
    provision(tmp_path / "fed", ["hospital_a"])
    bin_dir = Path(sys.executable).parent
    for command, script in (("flower-superlink", "superlink/start-superlink.sh"),
                            ("flower-supernode", "sites/hospital_a/start-supernode.sh")):
        known = subprocess.run([str(bin_dir / command), "--help"], capture_output=True,
                               text=True, timeout=60).stdout
        assert _flags(tmp_path / "fed" / script) <= set(re.findall(r"(--[a-z-]+)", known))


def test_provisioning_inside_the_apps_checkout_is_refused_unless_asked_for(tmp_path):
    from server.provision import main

    app = tmp_path / "checkout"
    (app / "client").mkdir(parents=True)
    (app / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.flwr.app]\n'
                                        'publisher = "medsilo"\n')
    with pytest.raises(ProvisionError, match=f"inside the Flower app at {app}"):
        provision(app / "federation", ["h1"])
    assert not (app / "federation").exists()  # nothing written
    assert main([str(app / "client" / "keys"), "--site", "h1"]) == 2
    assert not (app / "client" / "keys").exists()
    provision(app / "federation", ["h1"], inside_app=True)  # the operator insisted
    assert (app / "federation" / "sites" / "h1" / "supernode.key").is_file()
    provision(tmp_path / "outside", ["h1"])  # next to the checkout: fine
