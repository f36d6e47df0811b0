from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_RAW: _ClassVar[Encoding]
    ENCODING_FLOAT16: _ClassVar[Encoding]
    ENCODING_BFLOAT16: _ClassVar[Encoding]
    ENCODING_INT8_BLOCK256: _ClassVar[Encoding]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_RESULT: _ClassVar[ModelKind]
    MODEL_KIND_INITIAL: _ClassVar[ModelKind]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_DONE: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]

class JobMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_MODE_UNSPECIFIED: _ClassVar[JobMode]
    JOB_MODE_SYNC: _ClassVar[JobMode]
    JOB_MODE_ASYNC: _ClassVar[JobMode]
ENCODING_UNSPECIFIED: Encoding
ENCODING_RAW: Encoding
ENCODING_FLOAT16: Encoding
ENCODING_BFLOAT16: Encoding
ENCODING_INT8_BLOCK256: Encoding
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_RESULT: ModelKind
MODEL_KIND_INITIAL: ModelKind
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_DONE: RoundState
ROUND_STATE_FAILED: RoundState
JOB_MODE_UNSPECIFIED: JobMode
JOB_MODE_SYNC: JobMode
JOB_MODE_ASYNC: JobMode

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("job", "round", "client_id", "num_examples", "tensors", "total_size", "encoding", "base_version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    client_id: str
    num_examples: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_size: int
    encoding: Encoding
    base_version: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[str] = ..., num_examples: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_size: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., base_version: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("round", "client_id", "bytes_received", "accepted", "version", "staleness", "duplicate")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    bytes_received: int
    accepted: int
    version: int
    staleness: int
    duplicate: bool
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., accepted: _Optional[int] = ..., version: _Optional[int] = ..., staleness: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job", "round", "kind", "wait_seconds", "latest", "version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    kind: ModelKind
    wait_seconds: float
    latest: bool
    version: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., wait_seconds: _Optional[float] = ..., latest: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "tensors", "total_size", "encoding", "total_weight", "num_updates", "version")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_UPDATES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_size: int
    encoding: Encoding
    total_weight: float
    num_updates: int
    version: int
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_size: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., total_weight: _Optional[float] = ..., num_updates: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class PullChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("job", "round", "state", "expected", "quorum", "accepted", "in_flight", "deadline_unix", "total_weight", "detail", "tensors", "opened_unix", "closed_unix", "post_arrival_seconds", "mode", "version", "buffer_fill", "buffer_size", "refused_stale")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CLOSED_UNIX_FIELD_NUMBER: _ClassVar[int]
    POST_ARRIVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FILL_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_STALE_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    state: RoundState
    expected: int
    quorum: int
    accepted: int
    in_flight: int
    deadline_unix: float
    total_weight: float
    detail: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    opened_unix: float
    closed_unix: float
    post_arrival_seconds: float
    mode: JobMode
    version: int
    buffer_fill: int
    buffer_size: int
    refused_stale: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., expected: _Optional[int] = ..., quorum: _Optional[int] = ..., accepted: _Optional[int] = ..., in_flight: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., total_weight: _Optional[float] = ..., detail: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., opened_unix: _Optional[float] = ..., closed_unix: _Optional[float] = ..., post_arrival_seconds: _Optional[float] = ..., mode: _Optional[_Union[JobMode, str]] = ..., version: _Optional[int] = ..., buffer_fill: _Optional[int] = ..., buffer_size: _Optional[int] = ..., refused_stale: _Optional[int] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class ServerOptimizer(_message.Message):
    __slots__ = ("kind", "lr", "momentum", "beta1", "beta2", "tau")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lr: float
    momentum: float
    beta1: float
    beta2: float
    tau: float
    def __init__(self, kind: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., tau: _Optional[float] = ...) -> None: ...

class AsyncOptions(_message.Message):
    __slots__ = ("buffer_size", "concurrency", "max_staleness", "staleness", "staleness_exponent", "mean_staleness", "staleness_cutoff", "cutoff_weight", "keep_versions")
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    CUTOFF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KEEP_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    buffer_size: int
    concurrency: int
    max_staleness: int
    staleness: str
    staleness_exponent: float
    mean_staleness: float
    staleness_cutoff: int
    cutoff_weight: float
    keep_versions: int
    def __init__(self, buffer_size: _Optional[int] = ..., concurrency: _Optional[int] = ..., max_staleness: _Optional[int] = ..., staleness: _Optional[str] = ..., staleness_exponent: _Optional[float] = ..., mean_staleness: _Optional[float] = ..., staleness_cutoff: _Optional[int] = ..., cutoff_weight: _Optional[float] = ..., keep_versions: _Optional[int] = ...) -> None: ...

class OpenRoundHeader(_message.Message):
    __slots__ = ("job", "tensors", "total_size", "expected", "quorum", "deadline_seconds", "from_round", "encoding", "mode", "async_options", "optimizer")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FROM_ROUND_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ASYNC_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    job: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_size: int
    expected: int
    quorum: int
    deadline_seconds: float
    from_round: int
    encoding: Encoding
    mode: JobMode
    async_options: AsyncOptions
    optimizer: ServerOptimizer
    def __init__(self, job: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_size: _Optional[int] = ..., expected: _Optional[int] = ..., quorum: _Optional[int] = ..., deadline_seconds: _Optional[float] = ..., from_round: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., mode: _Optional[_Union[JobMode, str]] = ..., async_options: _Optional[_Union[AsyncOptions, _Mapping]] = ..., optimizer: _Optional[_Union[ServerOptimizer, _Mapping]] = ...) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: OpenRoundHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[OpenRoundHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class CloseRoundRequest(_message.Message):
    __slots__ = ("job", "round", "abort")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    abort: bool
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., abort: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("id", "pid", "role", "state", "folds", "updates_folded", "node")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FOLDED_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    role: str
    state: str
    folds: int
    updates_folded: int
    node: str
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., folds: _Optional[int] = ..., updates_folded: _Optional[int] = ..., node: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "uptime_seconds", "rounds", "workers", "shm_budget_bytes", "shm_used_bytes", "slots_in_use", "hierarchy", "gateways")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SHM_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_seconds: float
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    shm_budget_bytes: int
    shm_used_bytes: int
    slots_in_use: int
    hierarchy: str
    gateways: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., shm_budget_bytes: _Optional[int] = ..., shm_used_bytes: _Optional[int] = ..., slots_in_use: _Optional[int] = ..., hierarchy: _Optional[str] = ..., gateways: _Optional[_Iterable[str]] = ...) -> None: ...
