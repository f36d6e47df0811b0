import time

import numpy as np
import pytest

flwr_app = pytest.importorskip("flwr.app", reason="flwr (the [flower] extra) is not installed")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict  # noqa: E402

from heteroswitch.bias import Mode  # noqa: E402
from heteroswitch.flower import STATE_KEY, build_client_app, make_train_handler  # noqa: E402
from heteroswitch.models import make_model  # noqa: E402
from heteroswitch.trainer import TrainConfig  # noqa: E402

RNG = np.random.default_rng(0)
IMGS = RNG.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
LABS = RNG.integers(0, 12, 16)
CFG = TrainConfig(local_steps=2, batch_size=8, device="cpu")


def _model():
    return make_model(12, width=8, blocks=(1, 1))


def _msg(config: dict):
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                  created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=_model().state_dict()), "config": ConfigRecord(config)})
    return Message(content=content, metadata=md)


def _ctx():
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_handler_trains_and_reports_the_switch():
    h = make_train_handler(_model, lambda ctx: (IMGS, LABS), CFG)
    ctx = _ctx()
    reply = h(_msg({"hs-loss-ref": 1e-3, "server-round": 1}), ctx)
    assert reply.metadata.reply_to_message_id == "m1"
    m = reply.content["metrics"]
    assert m["num-examples"] == 16
    assert m["hs_level"] == 2 and m["hs_isp"] == 1 and m["hs_swad"] == 1  # loss >> reference
    assert set(reply.content["arrays"].keys()) == set(_model().state_dict().keys())
    assert STATE_KEY in ctx.state  # EMA kept for the next round
    # second round without a server reference: uses the EMA
    m2 = h(_msg({"server-round": 2}), ctx).content["metrics"]
    assert m2["hs_has_ref"] == 1.0


def test_client_app_with_fixed_mode_and_a_mod():
    seen = []

    def mod(msg, ctx, call_next):  # a pass-through mod, as the LIFL mod composes
        seen.append(msg.metadata.message_type)
        return call_next(msg, ctx)

    app = build_client_app(_model, lambda ctx: (IMGS, LABS), CFG, fixed_mode=Mode(isp=True), mods=[mod])
    reply = app(_msg({"lr": 0.01, "local-steps": 1}), _ctx())
    m = reply.content["metrics"]
    assert m["mode_isp"] == 1 and m["train_samples"] == 8 and "hs_level" not in m
    assert seen == [MessageType.TRAIN]
