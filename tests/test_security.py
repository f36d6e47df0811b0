"""Identities and credentials on a real server: mutual TLS, signed scoped tokens, revocation, the
plaintext rule, and no secret in any log line or error message. Every refusal leaves nothing stored."""
import logging
import os

import grpc
import pytest

from pki import CA
from support import assert_matches, expect, fedavg64, metric, perturb, small_model
from lifl import tokens
from lifl.cli import main
from lifl.client import Client
from lifl.config import ServerConfig, load_config
from lifl.server import EmbeddedServer

BASE = small_model()
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def refused(srv, reason):
    return metric(srv, "lifl_auth_refused_total", reason=reason)


def nothing_stored(c, rid, job="default", accepted=0):
    info = c.round_info(rid, job=job)
    assert (info.accepted, info.in_flight) == (accepted, 0), info


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(), CA("another CA")
    (d / "ca.crt").write_bytes(ca.pem)
    server = ca.issue("localhost", server=True).write(d, "server")
    return {"dir": d, "ca": ca, "other": other, "server": server, "ca_file": str(d / "ca.crt")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert main(["token", "keygen", "--key", str(d / "issuer.pem"), "--public", str(d / "server.pub")]) == 0
    tokens.keygen(d / "stranger.pem", d / "stranger.pub")
    return d


def test_mutual_tls_identity_comes_from_the_certificate(make_server, pki, capsys):
    ca = pki["ca"]
    cert, key = pki["server"]
    srv = make_server(tls_cert=cert, tls_key=key, tls_client_ca=pki["ca_file"], tls_operators=["ops"])
    ops, phone, stranger = ca.issue("ops"), ca.issue("phone-1"), pki["other"].issue("phone-1")
    ups = [perturb(BASE, i) for i in range(2)]
    tls = dict(root_cert=ca.pem, retry_s=0)
    with Client(srv.address, client_cert=ops.cert, client_key=ops.key, **tls) as op, \
            Client(srv.address, client_cert=phone.cert, client_key=phone.key, **tls) as c:
        rid = op.open_round(BASE, expected=2)
        expect(DENIED, "push as yourself", c.push, rid, ups[0], 1, "phone-2")         # another's identity
        expect(DENIED, "not administer", c.open_round, BASE, expected=1)             # clients do not open rounds
        expect(DENIED, "not administer", c.close_round, rid)
        expect(DENIED, "operators only", c.status)
        nothing_stored(op, rid)
        for bad in (Client(srv.address, **tls),                                      # no client certificate
                    Client(srv.address, client_cert=stranger.cert, client_key=stranger.key, **tls),  # foreign CA
                    Client(srv.address, retry_s=0)):                                 # plaintext
            with bad:
                with pytest.raises(Exception) as ei:
                    bad.push(rid, ups[0], 1, "phone-1")
                assert ei.value.code == grpc.StatusCode.UNAVAILABLE, ei.value
        nothing_stored(op, rid)
        c.push(rid, ups[0], 1, "phone-1")
        op.push(rid, ups[1], 3, "ops")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1, 3]))
    assert refused(srv, "identity") == 1 and refused(srv, "role") == 3
    assert srv.arena.stats().slots_in_use == 0
    # the command line: --ca, --cert, --key
    d = pki["dir"]
    ops_cert, ops_key = ops.write(d, "ops")
    remote = ["--address", srv.address, "--ca", pki["ca_file"]]
    assert main(["round", "info", *remote, "--cert", ops_cert, "--key", ops_key, "--round", str(rid)]) == 0
    assert f"round {rid} [default]: done" in capsys.readouterr().out
    assert main(["round", "info", *remote, "--round", str(rid)]) == 1           # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_mutual_tls_binds_a_signed_credential_to_its_certificate(make_server, pki, keys):
    ca = pki["ca"]
    cert, key = pki["server"]
    srv = make_server(tls_cert=cert, tls_key=key, tls_client_ca=pki["ca_file"], token_key=str(keys / "server.pub"))
    signer = (keys / "issuer.pem").read_bytes()
    ops, phone = ca.issue("ops"), ca.issue("phone-1")
    tls = dict(root_cert=ca.pem, client_cert=phone.cert, client_key=phone.key, retry_s=0)
    with Client(srv.address, token=tokens.issue(signer, "ops", "*", "operator"), root_cert=ca.pem,
                client_cert=ops.cert, client_key=ops.key) as op, \
            Client(srv.address, token=tokens.issue(signer, "phone-2", "default"), **tls) as theirs, \
            Client(srv.address, token=tokens.issue(signer, "phone-1", "default"), **tls) as mine:
        rid = op.open_round(BASE, expected=1)
        expect(DENIED, "client certificate", theirs.push, rid, BASE, 1, "phone-2")   # someone else's credential
        nothing_stored(op, rid)
        mine.push(rid, BASE, 1, "phone-1")
        nothing_stored(op, rid, accepted=1)
    assert refused(srv, "identity") == 1


def test_signed_credentials_are_scoped_expiring_and_revocable(make_server, keys, tmp_path, capsys):
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# token ids refused\n")
    srv = make_server(token_key=str(keys / "server.pub"), token_revoked=str(revoked), tokens=["static-c"])
    signer = str(keys / "issuer.pem")
    key = (keys / "issuer.pem").read_bytes()
    assert main(["token", "issue", "--key", signer, "--sub", "boss", "--job", "j1", "--role", "operator",
                 "--ttl", "600"]) == 0
    op_tok = capsys.readouterr().out.strip()
    c1_tok = tokens.issue(key, "c1", "j1", jti="c1-key-1")
    r1_tok = tokens.issue(key, "c2", "j1", rounds=[1])
    expired = tokens.issue(key, "c1", "j1", ttl_s=60, now=1_000_000.0)
    forged = tokens.issue((keys / "stranger.pem").read_bytes(), "c1", "j1", role="operator")
    ups = [perturb(BASE, i) for i in range(3)]
    with Client(srv.address, token=op_tok, retry_s=0) as op, Client(srv.address, token=c1_tok, retry_s=0) as c1, \
            Client(srv.address, token=r1_tok, retry_s=0) as c2:
        r1 = op.open_round(BASE, expected=3, job="j1")
        r2 = op.open_round(BASE, expected=3, job="j1")
        assert (r1, r2) == (1, 2)
        expect(DENIED, "job 'j1', not 'j2'", op.open_round, BASE, expected=1, job="j2")  # operator of j1 only
        expect(DENIED, "not administer", c1.open_round, BASE, expected=1, job="j1")
        expect(DENIED, "not administer", c1.close_round, r1, job="j1")
        expect(DENIED, "push as yourself", c1.push, r1, ups[0], 1, "c2", job="j1")
        expect(DENIED, "not 'default'", c1.push, r1, ups[0], 1, "c1")               # another job
        expect(DENIED, "not 'other'", c1.pull, r1, job="other", initial=True)
        expect(DENIED, "round 2", c2.push, r2, ups[0], 1, "c2", job="j1")           # round scope
        for tok, why in ((expired, "expired"), (forged, "does not verify"), ("a.b.c", "malformed"),
                         ("static-x", "unknown token")):
            with Client(srv.address, token=tok, retry_s=0) as bad:
                expect(UNAUTH, why, bad.push, r1, ups[0], 1, "c1", job="j1")
        for rid in (r1, r2):
            nothing_stored(op, rid, job="j1")
        c1.push(r1, ups[0], 1, "c1", job="j1")
        c2.push(r1, ups[1], 2, "c2", job="j1")
        with Client(srv.address, token="static-c") as legacy:                    # static tokens still work
            legacy.push(r1, ups[2], 3, "anyone", job="j1")
        assert_matches(c1.pull(r1, wait_s=30, job="j1"), fedavg64(ups, [1, 2, 3]))
        revoked.write_text("# token ids refused\nc1-key-1\n")                    # re-read on change
        expect(UNAUTH, "c1-key-1 has been revoked", c1.push, r2, ups[0], 1, "c1", job="j1")
        nothing_stored(op, r2, job="j1")
    counts = {r: refused(srv, r) for r in ("role", "identity", "job", "round", "expired", "invalid", "unknown",
                                           "revoked")}
    assert counts == {"role": 2, "identity": 1, "job": 3, "round": 1, "expired": 1, "invalid": 2, "unknown": 1,
                      "revoked": 1}
    assert srv.arena.stats().slots_in_use == 0


def test_no_secret_in_logs_or_errors(make_server, keys, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    key = (keys / "issuer.pem").read_bytes()
    secret_static, admin = "s3cret-static-token-value", "adm1n-secret-value"
    good = tokens.issue(key, "c1", "default", jti="jti-visible")
    forged = tokens.issue((keys / "stranger.pem").read_bytes(), "c1", "default")
    expired = tokens.issue(key, "c1", "default", ttl_s=1, now=1_000_000.0)
    srv = make_server(token_key=str(keys / "server.pub"), tokens=[secret_static], admin_token=admin)
    messages = []
    with Client(srv.address, token=admin) as op:
        rid = op.open_round(BASE, expected=1)
    for tok in (forged, expired, good[:-3] + "AAA", good + "x", secret_static + "y", admin[:-1]):
        with Client(srv.address, token=tok, retry_s=0) as c:
            messages.append(expect(UNAUTH, "", c.push, rid, BASE, 1, "c1").message)
    with Client(srv.address, token=good, retry_s=0) as c:
        messages.append(expect(DENIED, "", c.push, rid, BASE, 1, "c2").message)
        messages.append(expect(DENIED, "", c.open_round, BASE).message)
    # a token that is not one: the stream's bytes never reach a log either
    with pytest.raises(ValueError) as ei:
        tokens.Verifier(b"not a key")
    messages.append(str(ei.value))
    text = "\n".join(messages + [r.getMessage() + str(r.exc_info or "") for r in caplog.records])
    secrets = [secret_static, admin, admin[:-1], good, forged, expired, good.split(".")[2], forged.split(".")[2],
               key.decode().splitlines()[1], (keys / "server.pub").read_text().splitlines()[1]]
    for s in secrets:
        assert s not in text, "a secret leaked into a message or log line"
    assert sum("refused" in r.getMessage() for r in caplog.records) >= len(messages) - 1  # refusals are logged
    assert os.stat(keys / "issuer.pem").st_mode & 0o077 == 0     # the signing key is private to its owner


def test_plaintext_needs_loopback_or_an_explicit_insecure(make_server, capsys, caplog):
    with pytest.raises(ValueError, match="--insecure"):
        ServerConfig(host="0.0.0.0").validate()
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "not a loopback address" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost"):
        ServerConfig(host=host).validate()
    assert load_config(env={"LIFL_HOST": "0.0.0.0", "LIFL_INSECURE": "true"}).insecure
    caplog.set_level(logging.INFO, logger="lifl.transport")
    srv = make_server(host="0.0.0.0", insecure=True)
    assert any(r.levelno == logging.WARNING and "PLAINTEXT" in r.getMessage() for r in caplog.records)
    with Client(f"127.0.0.1:{srv.port}") as c:
        assert c.status().version


def test_bad_trust_settings_are_refused_before_serving(make_server, keys, tmp_path, capsys):
    for bad, why in (({"tls_client_ca": "ca.crt"}, "needs tls_cert"), ({"tls_operators": ["ops"]}, "needs tls_client_ca"),
                     ({"token_revoked": "r.txt"}, "needs token_key"), ({"rate_limit_burst": 0}, "rate_limit_burst"),
                     ({"keepalive_min_ping_interval_s": 0}, "keepalive"), ({"max_connection_age_s": -1}, "max_connection")):
        with pytest.raises(ValueError, match=why):
            ServerConfig(**bad).validate()
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello")
    with pytest.raises(ValueError, match="token_key is not a PEM public key"):
        make_server(token_key=str(not_a_key))
    with pytest.raises(FileNotFoundError):
        make_server(token_key=str(keys / "server.pub"), token_revoked=str(tmp_path / "missing.txt"))
    assert main(["token", "issue", "--key", str(not_a_key), "--sub", "a", "--job", "j"]) == 1
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
    assert main(["token", "keygen", "--key", str(keys / "issuer.pem"), "--public", str(tmp_path / "p.pub")]) == 1
    assert "File exists" in capsys.readouterr().err                     # a signing key is never overwritten
