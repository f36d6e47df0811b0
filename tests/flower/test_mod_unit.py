"""The LIFL mod and strategy against a real LIFL server, without a Flower runtime (fast)."""
from __future__ import annotations

from collections import OrderedDict

import grpc
import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,  # noqa: E402
                      RecordDict)
from flwr.app.metadata import Metadata  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedAvgM  # noqa: E402

from lifl.client import Client  # noqa: E402
from lifl.config import ServerConfig  # noqa: E402
from lifl.flower import LiflStrategy, error_code, lifl_mod, status_of  # noqa: E402
from lifl.flower import config as K  # noqa: E402
from benchmarks.flower_stack import free_port  # noqa: E402
from lifl.server import EmbeddedServer  # noqa: E402


@pytest.fixture(scope="module")
def server():
    with EmbeddedServer(ServerConfig(port=0, metrics_port=-1, shm_budget_mb=64)) as srv:
        yield srv


def model(seed=0, rows=3):
    rng = np.random.default_rng(seed)
    return OrderedDict([("w", rng.standard_normal((rows, 4)).astype(np.float32)),
                        ("b", rng.standard_normal(4).astype(np.float32))])


def train_msg(config: dict, arrays=None, mtype=MessageType.TRAIN) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                  created_at=0.0, ttl=3600.0, message_type=mtype)
    return Message(content=content, metadata=md)


def ctx(node_config=None, run_config=None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(),
                   run_config=run_config or {})


def handler(update, weight=10.0):
    def call_next(msg, context):
        metrics = MetricRecord({"num-examples": weight, "loss": 0.5}) if weight is not None else MetricRecord(
            {"loss": 0.5})
        return Message(content=RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
                                           "metrics": metrics}), reply_to=msg)
    return call_next


def lifl_cfg(rid, address):
    return {K.ROUND: rid, K.JOB: "default", K.ADDRESS: address, K.WEIGHT_KEY: "num-examples",
            K.ARRAYS_KEY: "arrays", K.PULL: False, "server-round": 1}


def test_push_replaces_arrays_with_receipt(server):
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=1)
        reply = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()), ctx(), handler(model(1), 12.0))
        assert not reply.has_error()
        assert not reply.content.array_records                     # the update did not go back via Flower
        receipt = reply.content.config_records[K.RECEIPT]
        assert receipt["round"] == rid and receipt["client-id"] == "node-7" and receipt["accepted"] == 1
        assert reply.content.metric_records["metrics"]["num-examples"] == 12.0   # metrics unchanged
        got = c.pull(rid, wait_s=30)
        for k, v in model(1).items():
            np.testing.assert_array_equal(got[k], v)


def test_non_lifl_messages_pass_through(server):
    reply = lifl_mod(train_msg({"server-round": 1}, model()), ctx(), handler(model(1)))
    assert "arrays" in reply.content.array_records                  # stock strategy: untouched
    reply = lifl_mod(train_msg(lifl_cfg(999, server.address), model(), MessageType.EVALUATE), ctx(),
                     handler(model(1)))
    assert "arrays" in reply.content.array_records


def test_lifl_down_is_an_error_reply():
    dead = f"127.0.0.1:{free_port()}"
    reply = lifl_mod(train_msg(lifl_cfg(1, dead), model()), ctx(), handler(model(1)))
    assert reply.has_error()
    assert reply.error.code == error_code(grpc.StatusCode.UNAVAILABLE) == 1014
    assert status_of(reply.error.code) == grpc.StatusCode.UNAVAILABLE
    assert reply.error.reason.startswith("LIFL UNAVAILABLE:") and dead in reply.error.reason


def test_node_config_address_overrides_the_announced_one(server):
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=1)
        dead = f"127.0.0.1:{free_port()}"
        reply = lifl_mod(train_msg(lifl_cfg(rid, dead), model()), ctx({"lifl-address": server.address}),
                         handler(model(2)))
        assert not reply.has_error(), reply.error
        assert c.round_info(rid).accepted == 1


def test_wrong_layout_is_refused_with_the_gateway_message(server):
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=2)
        reply = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()), ctx(), handler(model(1, rows=2)))
        assert reply.has_error()
        assert reply.error.code == error_code(grpc.StatusCode.INVALID_ARGUMENT)
        assert "INVALID_ARGUMENT" in reply.error.reason and "'w'" in reply.error.reason
        info = c.round_info(rid)
        assert info.accepted == 0 and info.state == "open"          # aggregate untouched
        c.close_round(rid, abort=True)


def test_missing_weight_metric_is_an_error_reply(server):
    reply = lifl_mod(train_msg(lifl_cfg(1, server.address), model()), ctx(), handler(model(1), weight=None))
    assert reply.has_error() and "num-examples" in reply.error.reason


def test_pull_option_puts_the_model_into_the_message(server):
    seen = {}

    def call_next(msg, context):
        seen.update({k: v.numpy() for k, v in msg.content["arrays"].items()})
        return handler(model(3))(msg, context)

    with Client(server.address) as c:
        rid = c.open_round(model(5), expected=1)
        cfg = {**lifl_cfg(rid, server.address), K.PULL: True}
        reply = lifl_mod(train_msg(cfg, arrays=None), ctx(), call_next)
        assert not reply.has_error(), reply.error
        assert list(seen) == ["w", "b"]
        for k, v in model(5).items():
            np.testing.assert_array_equal(seen[k], v)


@pytest.mark.parametrize("node_config, run_config", [({}, {"lifl-enabled": False}),
                                                      ({"lifl-enabled": "false"}, {"lifl-enabled": True})])
def test_lifl_enabled_false_makes_the_mod_pass_through(server, node_config, run_config):
    """Switched off by run config (whole federation) or one node's config (which wins): the handler's
    reply comes back as it is and nothing reaches LIFL."""
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=1)
        reply = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()), ctx(node_config, run_config),
                         handler(model(1), 12.0))
        assert not reply.has_error(), reply.error
        assert K.RECEIPT not in reply.content.config_records
        for k, v in model(1).items():
            np.testing.assert_array_equal(reply.content.array_records["arrays"][k].numpy(), v)
        info = c.round_info(rid)
        assert info.accepted == 0 and info.state == "open"
        c.close_round(rid, abort=True)


def test_node_config_lifl_enabled_overrides_the_run_config(server):
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=1)
        reply = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()),
                         ctx({"lifl-enabled": True}, {"lifl-enabled": False}), handler(model(1)))
        assert not reply.has_error(), reply.error
        assert K.RECEIPT in reply.content.config_records and c.round_info(rid).accepted == 1


def test_lifl_enabled_refusals_are_error_replies(server):
    reply = lifl_mod(train_msg(lifl_cfg(1, server.address), model()), ctx(run_config={"lifl-enabled": "maybe"}),
                     handler(model(1)))
    assert reply.has_error() and reply.error.code == error_code(grpc.StatusCode.INVALID_ARGUMENT)
    assert "lifl-enabled must be true or false, got 'maybe'" in reply.error.reason
    cfg = {**lifl_cfg(1, server.address), K.PULL: True}      # no model in the message: the mod is needed
    reply = lifl_mod(train_msg(cfg, arrays=None), ctx(run_config={"lifl-enabled": False}), handler(model(1)))
    assert reply.has_error() and reply.error.code == error_code(grpc.StatusCode.FAILED_PRECONDITION)
    assert "pull option" in reply.error.reason


def test_strategy_refuses_non_mean_strategies(server):
    from flwr.serverapp.strategy import FedAdam, FedMedian, FedTrimmedAvg, Krum

    for robust in (FedMedian(), FedTrimmedAvg(), Krum()):      # need every update, not the mean
        with pytest.raises(TypeError, match="allow_any"):
            LiflStrategy(robust, address=server.address)
    s = LiflStrategy(FedAvg(), address=server.address)
    assert s.weighted_by_key == "num-examples" and not s.server_step   # delegated to the wrapped FedAvg
    s.close()
    for opt in (FedAvgM(server_momentum=0.9), FedAdam()):     # a server step on the mean: accepted
        s = LiflStrategy(opt, address=server.address)
        assert s.server_step
        s.close()


@pytest.fixture
def task_identity(monkeypatch):
    """ServerApp-side Message construction reads the run/node/task ids the ServerApp process sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def _reply_to(m: Message, node_id: int) -> Message:
    md = m.metadata
    inst = Message(content=m.content, metadata=Metadata(
        run_id=1, message_id=f"m{node_id}", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
        group_id=md.group_id, created_at=0.0, ttl=3600.0, message_type=md.message_type))
    return inst


def test_strategy_closes_on_quorum_when_a_client_never_replies(server, task_identity):
    """3 sampled nodes, one never answers (Flower's timeout): the round closes on quorum and the
    result is the weighted mean of the two updates, metrics aggregated like FedAvg."""
    init = model(0)
    s = LiflStrategy(FedAvg(min_available_nodes=3, min_train_nodes=3), address=server.address, quorum=2)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in init.items()}), ConfigRecord(), FakeGrid(
        [11, 12, 13])))
    assert len(msgs) == 3
    cfg = msgs[0].content["config"]
    assert cfg[K.ROUND] >= 1 and cfg[K.ADDRESS] == server.address and "arrays" in msgs[0].content
    replies = []
    for m, w, seed in zip(msgs[:2], (10.0, 30.0), (1, 2)):
        inst = _reply_to(m, m.metadata.dst_node_id)
        replies.append(lifl_mod(inst, Context(run_id=1, node_id=m.metadata.dst_node_id, node_config={},
                                              state=RecordDict(), run_config={}), handler(model(seed), w)))
    assert not any(r.has_error() for r in replies)
    arrays, metrics = s.aggregate_train(1, replies)
    assert "with 2 of 3 updates (quorum 2)" in s.last_round_detail
    for k in init:
        want = (10 * model(1)[k].astype(np.float64) + 30 * model(2)[k]) / 40
        np.testing.assert_allclose(arrays[k].numpy(), want.astype(np.float32), rtol=1e-6)
    assert metrics["loss"] == pytest.approx(0.5)
    s.close()


def test_strategy_pull_option_sends_no_model(server, task_identity):
    s = LiflStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), address=server.address, pull_model=True)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in model().items()}), ConfigRecord(),
                                  FakeGrid([1, 2])))
    assert all(not m.content.array_records and m.content["config"][K.PULL] for m in msgs)
    s._client.close_round(msgs[0].content["config"][K.ROUND], abort=True)
    s.close()


def test_strategy_pull_option_opens_the_next_round_from_lifls_result(server, task_identity):
    """With pull_model the round after a LIFL-aggregated one starts from LIFL's own result
    (no upload, no copy); a model that is not that result is uploaded as before."""
    s = LiflStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), address=server.address, pull_model=True)
    rounds, arrays = [], ArrayRecord({k: Array(v) for k, v in model().items()})
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2])))
        rounds.append(msgs[0].content["config"][K.ROUND])
        with Client(server.address) as c:      # what the clients will pull: this round's model
            pulled = c.pull(rounds[-1], initial=True)
        for k in pulled:
            np.testing.assert_array_equal(pulled[k], arrays[k].numpy())
        replies = []
        for m, seed in zip(msgs, (rnd, rnd + 10)):
            ctx_m = Context(run_id=1, node_id=m.metadata.dst_node_id, node_config={}, state=RecordDict(),
                            run_config={})
            replies.append(lifl_mod(_reply_to(m, m.metadata.dst_node_id), ctx_m, handler(model(seed), 5.0)))
        arrays, _ = s.aggregate_train(rnd, replies)
    d = server.dispatcher
    assert d.get("default", rounds[0]).from_round == 0
    assert d.get("default", rounds[1]).from_round == rounds[0]
    other = ArrayRecord({k: Array(v + 1) for k, v in model().items()})  # e.g. a server-side step changed it
    msgs = list(s.configure_train(3, other, ConfigRecord(), FakeGrid([1, 2])))
    r3 = msgs[0].content["config"][K.ROUND]
    assert d.get("default", r3).from_round == 0
    with Client(server.address) as c:
        got = c.pull(r3, initial=True)
        c.close_round(r3, abort=True)
    for k in got:
        np.testing.assert_array_equal(got[k], model()[k] + 1)
    s.close()


# -- memory helpers: zero-copy views, one-copy Arrays, streamed pulls --------------------------------
def _odd_arrays():
    import ml_dtypes

    rng = np.random.default_rng(5)
    return OrderedDict([("a", rng.standard_normal((3, 5), dtype=np.float32)), ("empty", np.zeros((0, 4), np.float32)),
                        ("big", rng.standard_normal(700_001).astype(np.float32)), ("i", np.arange(7, dtype=np.int64)),
                        ("bf", np.ones(5, ml_dtypes.bfloat16)), ("scalar", np.array(2.5, np.float32)),
                        ("m", rng.standard_normal((1000, 999)).astype(np.float32))])


def test_arrays_to_numpy_views_the_record_bytes():
    from lifl.flower import arrays_to_numpy

    rec = ArrayRecord({k: Array(v) for k, v in _odd_arrays().items()})
    rec["fortran"] = Array(np.asfortranarray(np.arange(6.0).reshape(2, 3)))     # falls back to Array.numpy()
    got = arrays_to_numpy(rec)
    assert list(got) == list(rec)
    for k, v in got.items():
        ref = rec[k].numpy()
        assert v.dtype == ref.dtype and v.shape == ref.shape
        np.testing.assert_array_equal(v, ref)
    assert not got["m"].flags.writeable and np.shares_memory(got["m"], np.frombuffer(rec["m"].data, np.uint8))


def test_numpy_to_arrays_writes_the_same_npy_bytes_as_flower():
    from lifl.flower import numpy_to_arrays

    arrays = _odd_arrays()
    arrays["strided"] = np.arange(10.0)[::2]
    arrays["big-endian"] = np.array([1, 2], dtype=">i4")
    rec = numpy_to_arrays(arrays)
    for k, v in arrays.items():
        ref = Array(v)
        assert (rec[k].data, rec[k].dtype, rec[k].shape, rec[k].stype) == (ref.data, ref.dtype, ref.shape, ref.stype)
        assert rec[k].object_id == ref.object_id


@pytest.mark.parametrize("initial", [True, False])
def test_pull_arrays_streams_tensor_by_tensor_with_the_same_result(server, initial):
    from lifl.flower import numpy_to_arrays, pull_arrays

    arrays = _odd_arrays()
    with Client(server.address) as c:
        rid = c.open_round(arrays, expected=1)
        if not initial:
            c.push(rid, arrays, 3.0, "x")
        ref = numpy_to_arrays(c.pull(rid, wait_s=30, initial=initial))
        got = pull_arrays(c, rid, wait_s=30, initial=initial)
        assert list(got) == list(ref)
        for k in ref:
            assert got[k].data == ref[k].data and got[k].object_id == ref[k].object_id
        with pytest.raises(Exception) as e:
            pull_arrays(c, rid + 1000)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        if initial:
            c.close_round(rid, abort=True)


def test_strategy_without_pull_opens_the_round_with_the_layout_only(server, task_identity):
    """The model reaches clients through the SuperLink, so LIFL need not hold (nor receive) it."""
    s = LiflStrategy(FedAvg(min_available_nodes=2, min_train_nodes=2), address=server.address)
    msgs = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in model().items()}), ConfigRecord(),
                                  FakeGrid([1, 2])))
    rid = msgs[0].content["config"][K.ROUND]
    assert all("arrays" in m.content for m in msgs)
    with pytest.raises(Exception) as e:
        s._client.pull(rid, initial=True)
    assert e.value.code == grpc.StatusCode.NOT_FOUND                 # opened without an initial model
    s._client.close_round(rid, abort=True)
    s.close()


def test_proc_sampler_attributes_memory_per_role(shm_prefix):
    import os
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    from benchmarks.procsampler import ProcSampler

    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    seg = shared_memory.SharedMemory(name=f"{shm_prefix}-s", create=True, size=16 << 20)
    try:
        seg.buf[:] = b"\1" * (16 << 20)                                # tmpfs allocates the pages on write
        time.sleep(1.0)
        with ProcSampler([os.getpid()], interval=0.02, every=4, labels={os.getpid(): "me"},
                         shm_prefix=shm_prefix) as s:
            time.sleep(0.4)
        w = s.window(s.samples[0].t, s.samples[-1].t)
        assert set(w["at_peak"]) == {"me", "me-child"}
        assert w["role_peak"]["me-child"] > 60 << 20                 # the child's 64 MiB buffer
        assert sum(w["at_peak"].values()) == w["peak_pss"] == s.peak_pss
        assert w["shm_peak"] == s.peak_shm == 16 << 20               # the segment, by its allocated blocks
        assert s.peak_anon_shm >= (64 << 20) + (16 << 20)            # the buffer + the segment counted once
        assert s.peak_rss >= s.peak_pss
        # the cheap counters every tick, the smaps_rollup read (a full sample) every 4th
        assert s.ticks >= 5 and len(s.samples) == 1 + (s.ticks - 1) // 4
    finally:
        seg.close()
        seg.unlink()
        child.kill()
        child.wait()


def _self_signed(tmp_path):
    """A PEM key and certificate for 127.0.0.1 (cryptography comes with flwr)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lifl-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    kp, cp = tmp_path / "key.pem", tmp_path / "cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


def test_mod_over_tls_with_a_token_and_the_refusals(tmp_path):
    """TLS + bearer tokens from the node config: pushes land; a wrong token or a missing
    certificate is an error reply with the gateway's status, and nothing is folded."""
    kp, cp = _self_signed(tmp_path)
    cfg = ServerConfig(port=0, metrics_port=-1, shm_budget_mb=16, tls_cert=str(cp), tls_key=str(kp),
                       tokens=["node-secret"], admin_token="admin-secret")
    with EmbeddedServer(cfg) as srv, Client(srv.address, token="admin-secret", root_cert=cp.read_bytes()) as admin:
        rid = admin.open_round(model(), expected=2)
        msg = lifl_cfg(rid, srv.address)
        wrong = lifl_mod(train_msg(msg, model()), ctx({"lifl-token": "guess", "lifl-root-cert": str(cp)}),
                         handler(model(1)))
        assert wrong.has_error() and status_of(wrong.error.code) == grpc.StatusCode.UNAUTHENTICATED
        plain = lifl_mod(train_msg(msg, model()), ctx({"lifl-token": "node-secret"}), handler(model(1)))
        assert plain.has_error() and status_of(plain.error.code) == grpc.StatusCode.UNAVAILABLE
        missing = lifl_mod(train_msg(msg, model()),
                           ctx({"lifl-token": "node-secret", "lifl-root-cert": str(tmp_path / "nope.pem")}),
                           handler(model(1)))
        assert missing.has_error() and "cannot read lifl-root-cert" in missing.error.reason
        assert admin.round_info(rid).accepted == 0                     # none of them reached the round
        ok = lifl_mod(train_msg(msg, model()), ctx({"lifl-token": "node-secret", "lifl-root-cert": str(cp)}),
                      handler(model(1), 3.0))
        assert not ok.has_error() and ok.content.config_records[K.RECEIPT]["accepted"] == 1
        with Client(srv.address, token="node-secret", root_cert=cp.read_bytes()) as node:
            node.push(rid, model(2), 1.0, "other")
        got = admin.pull(rid, wait_s=30)
    want = {k: (3.0 * model(1)[k].astype(np.float64) + model(2)[k]) / 4.0 for k in model()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


def test_strategy_says_when_lifl_cannot_be_reached(task_identity, caplog):
    import socket
    with socket.socket() as sock:              # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = LiflStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), address=f"127.0.0.1:{port}",
                     )
    with pytest.raises(RuntimeError, match="could not be reached.*lifl serve"):
        list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in model().items()}), ConfigRecord(),
                               FakeGrid([1])))
    with caplog.at_level("INFO", logger="flwr.lifl"):
        s.summary()
    assert "deadline none," in caplog.text and "nones" not in caplog.text
    s.close()


def test_run_config_encoding_pushes_int8_and_a_bad_one_is_an_error_reply(server):
    """``lifl-encoding`` (node or run config) picks the update encoding; the result is the mean of
    the decoded int8 update, and an unknown name is refused before anything is sent."""
    from lifl import encoding
    from lifl.layout import Layout
    upd = model(5)
    with Client(server.address) as c:
        rid = c.open_round(model(), expected=1)
        bad = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()), ctx(run_config={K.NODE_ENCODING: "int3"}),
                       handler(upd))
        assert bad.has_error() and bad.error.code == error_code(grpc.StatusCode.INVALID_ARGUMENT)
        assert "lifl-encoding" in bad.error.reason and "int8" in bad.error.reason
        reply = lifl_mod(train_msg(lifl_cfg(rid, server.address), model()), ctx(run_config={K.NODE_ENCODING: "int8"}),
                         handler(upd))
        assert not reply.has_error(), reply.error
        enc = encoding.encoded(Layout.from_arrays(upd), encoding.Encoding.INT8_BLOCK256)
        assert reply.content.config_records[K.RECEIPT]["bytes"] == enc.total_size
        got = c.pull(rid, wait_s=30)
    for k, v in upd.items():   # one block per tensor: q * absmax/127 (decoded independently)
        scale = np.float32(np.abs(v).max() / 127)
        q = np.clip(np.rint(v.astype(np.float64) / np.float64(scale)), -127, 127)
        np.testing.assert_allclose(got[k], q * np.float64(scale), rtol=1e-6)


def test_mod_presents_a_client_certificate_to_a_mutual_tls_server(tmp_path):
    """``lifl-ca`` + ``lifl-cert`` + ``lifl-key``: the mod pushes over mutual TLS as its certificate's
    identity (the common name, the client id such a server requires). Without a certificate the
    handshake fails (UNAVAILABLE); a ``lifl-client-id`` other than the certificate's is
    PERMISSION_DENIED; a certificate without its key is refused before anything is sent."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pki import CA
    ca = CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.pem)
    scert, skey = ca.issue("localhost", server=True).write(tmp_path, "server")
    site_cert, site_key = ca.issue("site-3").write(tmp_path, "site-3")
    ops = ca.issue("ops")
    cfg = ServerConfig(port=0, metrics_port=-1, shm_budget_mb=16, tls_cert=scert, tls_key=skey,
                       tls_client_ca=str(ca_file), tls_operators=["ops"])
    tls = {"lifl-ca": str(ca_file), "lifl-cert": site_cert, "lifl-key": site_key}
    with EmbeddedServer(cfg) as srv, Client(srv.address, root_cert=ca.pem, client_cert=ops.cert,
                                            client_key=ops.key) as admin:
        rid = admin.open_round(model(), expected=1)
        msg = lifl_cfg(rid, srv.address)
        bare = lifl_mod(train_msg(msg, model()), ctx({"lifl-ca": str(ca_file)}), handler(model(1)))
        assert bare.has_error() and status_of(bare.error.code) == grpc.StatusCode.UNAVAILABLE
        other = lifl_mod(train_msg(msg, model()), ctx({**tls, "lifl-client-id": "site-4"}), handler(model(1)))
        assert other.has_error() and status_of(other.error.code) == grpc.StatusCode.PERMISSION_DENIED
        half = lifl_mod(train_msg(msg, model()), ctx({"lifl-ca": str(ca_file), "lifl-cert": site_cert}),
                        handler(model(1)))
        assert half.has_error() and "go together" in half.error.reason
        assert admin.round_info(rid).accepted == 0
        ok = lifl_mod(train_msg(msg, model()), ctx(run_config=tls), handler(model(1), 3.0))
        assert not ok.has_error(), ok.error.reason if ok.has_error() else ""
        assert ok.content.config_records[K.RECEIPT]["client-id"] == "site-3"
        got = admin.pull(rid, wait_s=30)
    for k, v in model(1).items():
        np.testing.assert_array_equal(got[k], v)
