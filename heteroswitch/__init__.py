"""HeteroSwitch: detect device-induced data bias on a federated client and answer it
with ISP transformation and SWAD (after Kim et al., MLSys 2024).

Public API (everything else is internal):

* ISP ops: :mod:`heteroswitch.isp` -- ``RandomISP``, ``RandomISPConfig`` and the
  pure ops (``srgb_to_linear``, ``apply_white_balance``, ``mosaic``, ...).
* SWAD: ``SWAD``, ``SWADConfig``, ``ValleyDetector``, ``WeightAverager``.
* Bias switch: ``BiasSwitch``, ``SwitchConfig``, ``Mode``, ``Decision``.
* Training: ``TrainConfig``, ``train_local``, ``evaluate_devices``, ``make_model``.
* Data: ``load_profile``, ``DEVICE_NAMES``, ``FederatedConfig``,
  ``make_federated_dataset``, ``FlairReader``.
* Metrics: ``average_precision``, ``device_summary``.
* Flower: ``heteroswitch.flower.build_client_app`` / ``make_train_handler``
  (imported lazily: it needs the ``flwr`` extra).
* Benchmark: ``heteroswitch bench`` (``python -m heteroswitch bench``), or
  ``heteroswitch.bench.run_bench``.

The platform is reached only through ``lifl.client`` / ``lifl.server``
(see :mod:`heteroswitch.aggregate`).
"""

from .bias import BiasSwitch, Decision, Mode, ServerReference, SwitchConfig
from .devices import DEVICE_NAMES, DeviceProfile, load_profile, load_profiles
from .flair import FlairReader, FlairUser
from .isp import RandomISP, RandomISPConfig
from .metrics import accuracy, average_precision, device_summary
from .models import SmallResNet, make_model
from .scenes import FederatedConfig, FederatedDataset, SceneConfig, make_federated_dataset
from .swad import SWAD, SWADConfig, ValleyDetector, WeightAverager
from .trainer import TrainConfig, TrainResult, evaluate_devices, train_local

__all__ = [
    "BiasSwitch", "Decision", "Mode", "ServerReference", "SwitchConfig",
    "DEVICE_NAMES", "DeviceProfile", "load_profile", "load_profiles",
    "FlairReader", "FlairUser",
    "RandomISP", "RandomISPConfig",
    "accuracy", "average_precision", "device_summary",
    "SmallResNet", "make_model",
    "FederatedConfig", "FederatedDataset", "SceneConfig", "make_federated_dataset",
    "SWAD", "SWADConfig", "ValleyDetector", "WeightAverager",
    "TrainConfig", "TrainResult", "evaluate_devices", "train_local",
]
__version__ = "0.1.0"
