"""Named sizes (``--preset``) and named data (``--benchmark``) of the benchmark, and the
``--scene K=V,...`` override parser: plain data the command line turns into a
:class:`~heteroswitch.bench.config.BenchConfig`."""

from __future__ import annotations

import dataclasses

from ..scenes import SceneConfig

PRESETS: dict[str, dict] = {
    "tiny": dict(rounds=2, clients_per_round=3, eval_every=1, width=8, blocks=(1, 1), image_size=16, base_size=32,
                 num_clients=12, samples_per_client=12, test_per_class=2, local_steps=3, batch_size=8,
                 swad_eval_every=1, swad_eval_samples=8),
    "cpu": dict(rounds=30, clients_per_round=8, eval_every=5, width=16, blocks=(1, 1, 1), image_size=32, base_size=64,
                num_clients=90, samples_per_client=48, test_per_class=20, local_steps=12, batch_size=32,
                swad_eval_every=2, swad_eval_samples=48),
    "gpu": dict(rounds=60, clients_per_round=10, eval_every=5, width=32, blocks=(1, 1, 1, 1), image_size=64,
                base_size=128, num_clients=120, samples_per_client=64, test_per_class=30, local_steps=20,
                batch_size=32, swad_eval_every=2, swad_eval_samples=64),
}


_TRADEOFF_DEVICES = dict(
    profile_set="tradeoff",
    device_mix={"GalaxyS22": 0.28, "GalaxyS9": 0.12, "GalaxyS6": 0.08, "VELVET": 0.22, "G7": 0.08, "G4": 0.0,
                "Pixel5": 0.12, "Pixel2": 0.06, "Nexus5X": 0.04},
)
BENCHMARKS: dict[str, dict] = {
    "rev2": {},
    # the reported trade-off benchmark; switch defaults chosen on validation seed 100 (docs/heteroswitch.md)
    "tradeoff": dict(
        scene=dict(colour_pairs=6, pair_hue_delta=0.025, pair_saturation=(0.35, 0.95), texture_noise=0.2,
                   fg_value=(0.3, 0.9), hue_jitter=0.015, colour_correlation=0.6),
        switch=dict(thresholds=(0.05, 0.5), colour_threshold=0.2),
        **_TRADEOFF_DEVICES,
    ),
    # the first, easier variant (4 colour pairs): saturates (FedAvg 99 AP at 64x64); the first calibration ran on it
    "tradeoff-easy": dict(
        scene=dict(colour_pairs=4, colour_correlation=0.6, hue_jitter=0.015, pair_hue_delta=0.07),
        switch=dict(thresholds=(-0.3, 0.5), colour_threshold=0.2),
        **_TRADEOFF_DEVICES,
    ),
}


def parse_scene_overrides(text: str) -> dict:
    """``"k=v,k2=lo:hi"`` -> typed :class:`SceneConfig` overrides; unknown fields raise ``ValueError``."""
    fields = {f.name: f for f in dataclasses.fields(SceneConfig)}
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or k not in fields:
            raise ValueError(f"--scene: {item!r} is not FIELD=VALUE with FIELD one of {sorted(fields)}")
        default = getattr(SceneConfig(), k)
        try:
            out[k] = tuple(float(x) for x in v.split(":")) if isinstance(default, tuple) else type(default)(v)
        except ValueError:
            raise ValueError(f"--scene: {k} needs a {type(default).__name__}, got {v!r}") from None
    return out
