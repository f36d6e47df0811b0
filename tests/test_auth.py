"""Token authorization: the pure rule, and the interceptor on a real server (nothing stored on refusal)."""
import grpc
import pytest

from support import expect, small_model
from lifl.auth import Policy, Principal, Refusal, authenticate, authorize, check_scope
from lifl.client import Client

BASE = small_model()
PUSH, OPEN, STATUS = "/lifl.v1.Aggregation/Push", "/lifl.v1.Admin/OpenRound", "/lifl.v1.Admin/Status"


def test_the_rule():
    toks, adm = ["c1"], "root"
    assert authorize(PUSH, "", [], "") is None                               # no tokens configured: open
    assert authorize("/grpc.health.v1.Health/Check", "", toks, adm) is None  # not LIFL's services
    assert authorize(PUSH, "", toks, adm).code == "UNAUTHENTICATED"
    assert authorize(PUSH, "Bearer nope", toks, adm).code == "UNAUTHENTICATED"
    assert authorize(PUSH, "Bearer c1", toks, adm) is None
    assert authorize(PUSH, "bearer root", toks, adm) is None                 # the admin may push too
    assert authorize(STATUS, "Bearer c1", toks, adm) is None
    assert authorize(OPEN, "Bearer c1", toks, adm).code == "PERMISSION_DENIED"
    assert authorize(OPEN, "Bearer root", toks, adm) is None
    assert authorize(OPEN, "Bearer c1", toks, "").code == "PERMISSION_DENIED"
    assert authorize(OPEN, "Bearer ", toks, "").code == "UNAUTHENTICATED"    # an empty admin token never matches


def test_refused_calls_reach_no_handler_and_are_counted(make_server):
    srv = make_server(tokens=["c1"], admin_token="root")
    with Client(srv.address, token="root") as admin:
        rid = admin.open_round(BASE, expected=2)
    with Client(srv.address, retry_s=0) as anon, Client(srv.address, token="c1", retry_s=0) as c1, \
            Client(srv.address, token="bad", retry_s=0) as bad:
        expect(grpc.StatusCode.UNAUTHENTICATED, "missing", anon.push, rid, BASE, 1, "a")
        expect(grpc.StatusCode.UNAUTHENTICATED, "unknown token", bad.push, rid, BASE, 1, "a")
        expect(grpc.StatusCode.PERMISSION_DENIED, "not administer", c1.open_round, BASE, expected=1)
        expect(grpc.StatusCode.PERMISSION_DENIED, "not administer", c1.close_round, rid)
        expect(grpc.StatusCode.UNAUTHENTICATED, "missing", anon.pull, rid, initial=True)
        assert c1.round_info(rid).accepted == 0 and c1.round_info(rid).in_flight == 0
        c1.push(rid, BASE, 1, "a")
        assert c1.round_info(rid).accepted == 1
    rejected = srv.metrics.registry.get_sample_value("lifl_updates_rejected_total", {"reason": "unauthenticated"})
    assert rejected == 2


def test_certificate_identities_and_scopes():
    pol = Policy(mtls=True, operators=frozenset({"ops"}))
    assert authenticate(OPEN, "", "ops", pol).role == "operator"
    phone = authenticate(PUSH, "", "phone", pol)
    assert (phone.subject, phone.role, phone.job) == ("phone", "client", None)
    for method in (OPEN, STATUS):
        with pytest.raises(Refusal) as ei:
            authenticate(method, "", "phone", pol)
        assert (ei.value.code, ei.value.why) == ("PERMISSION_DENIED", "role")
    # a static token under mutual TLS still pushes only as the certificate's identity
    assert authenticate(PUSH, "Bearer c1", "phone", Policy(frozenset({"c1"}), mtls=True)).subject == "phone"
    signed = Principal("signed", "client", subject="c1", job="j1", rounds=frozenset({3}), scoped=True)
    check_scope(signed, "j1", 3, "c1")
    check_scope(None, "any", 9, "anyone")                                     # no auth configured
    check_scope(Principal("token", "client"), "any", 9, "anyone")            # static tokens: any id, any job
    for args, why in ((("j2", 3, "c1"), "job"), (("j1", 4, "c1"), "round"), (("j1", 3, "c2"), "identity")):
        with pytest.raises(Refusal) as ei:
            check_scope(signed, *args)
        assert (ei.value.code, ei.value.why) == ("PERMISSION_DENIED", why)
