"""Flower ``ClientApp`` integration (Message API, flwr >= 1.42).

:func:`make_train_handler` returns a ``train`` handler built on
:func:`heteroswitch.trainer.train_local`; :func:`build_client_app` wires it
into a ``ClientApp``.  It composes with LIFL's client mod: pass
``mods=[lifl.flower.lifl_mod]`` and the reply's arrays stream to the LIFL
gateway instead of the SuperLink.  The handler writes the weighting metric
``num-examples`` that both Flower's FedAvg and the LIFL mod read.

Message contract:

* in: ``content["arrays"]`` (ArrayRecord, the global model), optional
  ``content["config"]`` (ConfigRecord) with ``lr``, ``local-steps``,
  ``server-round`` and ``hs-loss-ref`` (the server's reference loss for the
  bias signal; e.g. the weighted mean of last round's ``hs_loss_global``).
* out: ``content["arrays"]`` (the trained model), ``content["metrics"]``
  (MetricRecord): ``num-examples`` plus every trainer metric -- the switch's
  level, signal, losses and decisions (``hs_*``), SWAD's valley report
  (``swad_*``) and the compute accounting -- so the server sees who switched
  and why.

The switch's own state (the EMA of this client's global-model losses) lives in
``context.state["heteroswitch"]`` so it survives across rounds of a run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from .bias import BiasSwitch, Mode, SwitchConfig
from .trainer import TrainConfig, train_local

__all__ = ["make_train_handler", "build_client_app", "STATE_KEY"]

STATE_KEY = "heteroswitch"

DataFn = Callable[["object"], tuple[np.ndarray, np.ndarray]]  # context -> (images (N,3,H,W), labels (N,))


def make_train_handler(
    model_fn: Callable[[], torch.nn.Module],
    data_fn: DataFn,
    train_config: TrainConfig | None = None,
    switch_config: SwitchConfig | None = None,
    fixed_mode: Mode | None = None,
):
    """Build ``handler(msg, context) -> Message``.

    ``fixed_mode`` turns the switch off (baselines); otherwise HeteroSwitch
    decides per round from the received model's loss.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    base_cfg = train_config or TrainConfig()
    sw_cfg = switch_config or SwitchConfig()

    def handler(msg: Message, context) -> Message:
        cfg_rec = msg.content.get("config") or ConfigRecord()
        arrays = msg.content.get("arrays")
        if arrays is None:
            raise ValueError("train message has no 'arrays' record (the global model)")
        model = model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        cfg = base_cfg
        if "lr" in cfg_rec:
            cfg = dataclasses.replace(cfg, lr=float(cfg_rec["lr"]))
        if "local-steps" in cfg_rec:
            cfg = dataclasses.replace(cfg, local_steps=int(cfg_rec["local-steps"]))
        images, labels = data_fn(context)
        rnd = int(cfg_rec.get("server-round", 0))
        seed = (int(context.node_id) * 1_000_003 + rnd) % (2**31)
        if fixed_mode is not None:
            res = train_local(model, images, labels, cfg, mode=fixed_mode, seed=seed)
        else:
            state = context.state.get(STATE_KEY)
            ema = float(state["ema"]) if state is not None and "ema" in state else None
            switch = BiasSwitch(sw_cfg, ema=ema)
            if state is not None and "last-level" in state:  # for the switch's hysteresis
                switch.last_level = int(state["last-level"])
            ref = cfg_rec.get("hs-loss-ref")
            res = train_local(model, images, labels, cfg, switch=switch,
                              server_ref=None if ref is None else float(ref), seed=seed)
            if switch.ema is not None:
                rec = {"ema": float(switch.ema)}
                if switch.last_level is not None:
                    rec["last-level"] = int(switch.last_level)
                context.state[STATE_KEY] = ConfigRecord(rec)
        metrics = {k: float(v) for k, v in res.metrics.items() if np.isfinite(v)}
        metrics["num-examples"] = int(res.num_examples)
        content = RecordDict({
            "arrays": ArrayRecord(torch_state_dict=model.state_dict()),
            "metrics": MetricRecord(metrics),
        })
        return Message(content=content, reply_to=msg)

    return handler


def build_client_app(model_fn, data_fn, train_config: TrainConfig | None = None,
                     switch_config: SwitchConfig | None = None, fixed_mode: Mode | None = None, mods=None):
    """A ``ClientApp`` whose ``train`` handler is HeteroSwitch; ``mods`` e.g. ``[lifl.flower.lifl_mod]``."""
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=list(mods or []))
    app.train()(make_train_handler(model_fn, data_fn, train_config, switch_config, fixed_mode))
    return app
