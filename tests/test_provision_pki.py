"""Provisioning without a broker: secret files' modes on every write, participant-made keys
signed from their requests (the operator never holds them), the CA kept apart from the
broker's files, the TLS listener's settings and the run admin's tag. The same flows against
real RabbitMQ nodes are in tests/test_security.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from brokerfl.cli import main
from brokerfl.config import load_config
from brokerfl.ops.certs import SigningRefused, check_request, write_signing_request
from brokerfl.ops.provision import ADMIN_TAG, provision, read_env_file

RUN = "acme"


def config(clients: int = 2):
    return load_config(None, {"run": RUN, "clients": clients})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_reprovisioning_tightens_a_loose_env_file_and_replaces_a_planted_link(tmp_path):
    out = tmp_path / "fed"
    done = provision(config(), out)
    env = done.env_files[f"{RUN}-client-0"]
    env.chmod(0o644)
    out.chmod(0o755)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a secret\n")
    elsewhere.chmod(0o644)
    planted = done.env_files[f"{RUN}-client-1"]
    planted.unlink()
    planted.symlink_to(elsewhere)  # a link at a secret's name: replaced, never written through

    again = provision(config(), out)
    assert mode(env) == 0o600 and mode(out) == 0o700
    assert all(mode(path) == 0o600 and not path.is_symlink() for path in again.env_files.values())
    assert elsewhere.read_text() == "not a secret\n" and mode(elsewhere) == 0o644
    password = next(p.password for p in again.participants if p.user == f"{RUN}-client-0")
    assert password in read_env_file(env)["BROKERFL_AMQP_URL"]  # the new password, in the tightened file
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_tls_keys_and_directories_are_private_every_time(tmp_path):
    out, ca_dir = tmp_path / "fed", tmp_path / "ca"
    provision(config(), out, tls=True, ca_dir=ca_dir)
    for key in [*(out / "tls").glob("*.key"), ca_dir / "ca.key"]:
        key.chmod(0o644)
    (out / "tls").chmod(0o755)
    ca_dir.chmod(0o755)
    provision(config(), out, tls=True, ca_dir=ca_dir)
    keys = [*(out / "tls").glob("*.key"), ca_dir / "ca.key"]
    assert len(keys) == 6 and all(mode(k) == 0o600 for k in keys)  # broker, server, admin, two clients, the CA
    assert mode(out / "tls") == mode(ca_dir) == mode(out) == 0o700


def test_a_participant_made_key_is_signed_and_never_reaches_the_operator(tmp_path, capsys):
    site, out, ca_dir = tmp_path / "site-1", tmp_path / "fed", tmp_path / "ca"
    user = f"{RUN}-client-1"
    assert main(["keygen", "--user", user, "--out", str(site)]) == 0
    key_path, request = site / f"{user}.key", site / f"{user}.csr"
    assert mode(key_path) == 0o600 and mode(site) == 0o700
    assert (
        main(["keygen", "--user", user, "--out", str(site)]) == 2
    )  # the key is kept: a certificate may be signed for it
    assert "exists" in capsys.readouterr().err
    args = ["provision", "--run", RUN, "--clients", "2", "--tls", "--out", str(out), "--ca-dir", str(ca_dir)]
    assert main([*args, "--sign", str(request)]) == 0
    assert f"signed from their own requests: {user}" in capsys.readouterr().out

    cert = x509.load_pem_x509_certificate((out / "tls" / f"{user}.pem").read_bytes())
    own_key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert cert.public_key().public_numbers() == own_key.public_key().public_numbers()
    ca = x509.load_pem_x509_certificate((out / "tls" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    # the operator's side holds no key of the participant's, and no CA key beside the broker's files
    key_bytes = key_path.read_bytes()
    operator_files = [f for f in [*out.rglob("*"), *ca_dir.rglob("*")] if f.is_file()]
    assert not any(key_bytes in f.read_bytes() for f in operator_files)
    assert not (out / "tls" / f"{user}.key").exists() and not list(out.rglob("ca.key"))
    env = read_env_file(out / f"{user}.env")
    assert "BROKERFL_TLS_KEY" not in env and env["BROKERFL_TLS_CERT"].endswith(f"{user}.pem")
    assert "BROKERFL_TLS_KEY=" in (out / f"{user}.env").read_text()  # said, as a comment, where to put it

    # re-provisioning keeps the CA and signs the kept request again: no new request needed
    assert main(args) == 0
    assert (out / "tls" / "ca.pem").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    again = x509.load_pem_x509_certificate((out / "tls" / f"{user}.pem").read_bytes())
    assert again.public_key().public_numbers() == own_key.public_key().public_numbers()
    assert not (out / "tls" / f"{user}.key").exists()


def _request(common_names: list[str], key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn) for cn in common_names])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def test_requests_the_operator_refuses(tmp_path):
    users = [f"{RUN}-client-0", f"{RUN}-server"]
    with pytest.raises(SigningRefused, match="not a participant of this run"):
        check_request(_request(["other-client-0"]), users)
    with pytest.raises(SigningRefused, match="2 common names"):
        check_request(_request([f"{RUN}-client-0", f"{RUN}-server"]), users)
    with pytest.raises(SigningRefused, match="not a PEM certificate signing request"):
        check_request(b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n", users)
    with pytest.raises(SigningRefused, match="more than a certificate signing request"):
        check_request(b"x" * 100_000, users)
    with pytest.raises(SigningRefused, match="too short"):
        check_request(
            _request([f"{RUN}-client-0"], rsa.generate_private_key(public_exponent=65537, key_size=1024)), users
        )
    # a request whose signature does not verify: the public key swapped for another's
    mine, theirs = _request([f"{RUN}-client-0"]), x509.load_pem_x509_csr(_request([f"{RUN}-client-0"]))
    spliced = x509.load_pem_x509_csr(mine).public_bytes(serialization.Encoding.DER)
    own_spki = (
        x509.load_pem_x509_csr(mine)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    other_spki = theirs.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = x509.load_der_x509_csr(spliced.replace(own_spki, other_spki)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(SigningRefused, match="signature does not verify"):
        check_request(forged, users)
    with pytest.raises(ValueError, match="not a broker user name"):
        write_signing_request(tmp_path, "../escape")


def test_a_refused_request_changes_nothing(tmp_path, capsys):
    out, ca_dir = tmp_path / "fed", tmp_path / "ca"
    provision(config(), out, tls=True, ca_dir=ca_dir)
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    _, stranger = write_signing_request(tmp_path / "stranger", "other-client-0")
    assert (
        main(
            [
                "provision",
                "--run",
                RUN,
                "--clients",
                "2",
                "--tls",
                "--out",
                str(out),
                "--ca-dir",
                str(ca_dir),
                "--sign",
                str(stranger),
            ]
        )
        == 2
    )
    assert "is for other-client-0, not a participant of this run" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # passwords and certificates unchanged
    # a site's request for another user (here the server's), sent under its own name: refused,
    # unless the operator says whose it is
    _, slipped = write_signing_request(tmp_path / "site-0", f"{RUN}-server")
    misnamed = slipped.rename(slipped.with_name(f"{RUN}-client-0.csr"))
    assert (
        main(
            [
                "provision",
                "--run",
                RUN,
                "--clients",
                "2",
                "--tls",
                "--out",
                str(out),
                "--ca-dir",
                str(ca_dir),
                "--sign",
                str(misnamed),
            ]
        )
        == 2
    )
    assert f"is a request for {RUN}-server, not for {RUN}-client-0" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    done = provision(config(), tmp_path / "named", tls=True, requests=[(f"{RUN}-server", misnamed)])
    assert done.self_keyed == [f"{RUN}-server"]
    with pytest.raises(ValueError, match="handed to the broker"):
        provision(config(), out, tls=True, ca_dir=out / "ca")
    with pytest.raises(ValueError, match="need TLS"):
        provision(config(), out, ca_dir=tmp_path / "ca")
    with pytest.raises(ValueError, match="need TLS"):
        provision(config(), out, requests=[stranger])
    with pytest.raises(ValueError, match="password is the only way"):
        provision(config(), out, password_login=False)


def test_the_tls_listener_pins_tls_1_2_and_turns_password_login_off_by_default(tmp_path):
    strict = provision(config(), tmp_path / "strict", tls=True).rabbitmq_conf.read_text().splitlines()
    assert "ssl_options.versions.1 = tlsv1.3" in strict and "ssl_options.versions.2 = tlsv1.2" in strict
    assert not any(line.startswith("ssl_options.versions.3") for line in strict)
    assert [line for line in strict if line.startswith("auth_mechanisms")] == ["auth_mechanisms.1 = EXTERNAL"]
    both = provision(config(), tmp_path / "both", tls=True, password_login=True).rabbitmq_conf.read_text().splitlines()
    assert [line for line in both if line.startswith("auth_mechanisms")] == [
        "auth_mechanisms.1 = EXTERNAL",
        "auth_mechanisms.2 = PLAIN",
    ]
    assert main(["provision", "--run", RUN, "--tls", "--password-login", "--out", str(tmp_path / "cli")]) == 0
    assert "auth_mechanisms.2 = PLAIN" in (tmp_path / "cli" / "rabbitmq.conf").read_text()


def test_only_the_run_admin_has_a_tag_and_it_is_management(tmp_path):
    done = provision(config(), tmp_path)
    tags = {u["name"]: u["tags"] for u in json.loads(done.definitions.read_text())["users"]}
    assert ADMIN_TAG == "management"
    assert tags == {f"{RUN}-server": [], f"{RUN}-admin": ["management"], f"{RUN}-client-0": [], f"{RUN}-client-1": []}
    assert mode(done.definitions) == 0o644 and os.access(done.definitions, os.R_OK)  # hashes only: the broker reads it
