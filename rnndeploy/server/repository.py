"""A Triton Inference Server model repository, each ``config.pbtxt`` read as Triton's ``ModelConfig`` message.

The layout is Triton's: one folder per model holding ``config.pbtxt`` (``ModelConfig`` in protobuf text format)
and numbered version folders::

    repo/<model>/config.pbtxt
    repo/<model>/<version>/<model file>      version: 1, 2, ... (ASCII digits, not starting with 0; other
                                             names are not versions)

The schema is tritonclient's generated ``model_config_pb2`` and the text is read by protobuf's ``text_format``,
so a config reads here exactly as Triton reads it. Before parsing, a config's size and the nesting of its
blocks are bounded; after it, every value the server uses is range-checked. Every error is a
`RepositoryError` naming the file, the field (and, for syntax, the line) and the problem.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pool, text_format
from tritonclient.grpc import model_config_pb2 as mc

from rnndeploy.server.protocol import MAX_DIM, MAX_DIMS

CONFIG_FILE = "config.pbtxt"
MAX_CONFIG_BYTES = 2**20  # Triton's configs are a few kB; a larger one is refused before parsing
MAX_NESTING = 16  # ModelConfig's blocks nest 5 deep at most
MAX_BATCH_SIZE = 2**16
MAX_QUEUE_DELAY_US = 10_000_000
MAX_IDLE_US = 86_400 * 10**6
DEFAULT_IDLE_US = 1_000_000  # Triton's max_sequence_idle_microseconds when the config gives none (or 0)
_VERSION = re.compile(r"[1-9][0-9]{0,18}")  # str.isdigit() also takes digits of other scripts ('١')
_BLOCKS = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\#[^\n]*|([{<\[])|([}>\]])""")

# Triton's data types, with the KServe v2 datatype and the numpy dtype of each (None: numpy has none)
DATA_TYPES: dict[str, tuple[str, np.dtype | None]] = {
    "TYPE_BOOL": ("BOOL", np.dtype(np.bool_)),
    "TYPE_UINT8": ("UINT8", np.dtype(np.uint8)),
    "TYPE_UINT16": ("UINT16", np.dtype(np.uint16)),
    "TYPE_UINT32": ("UINT32", np.dtype(np.uint32)),
    "TYPE_UINT64": ("UINT64", np.dtype(np.uint64)),
    "TYPE_INT8": ("INT8", np.dtype(np.int8)),
    "TYPE_INT16": ("INT16", np.dtype(np.int16)),
    "TYPE_INT32": ("INT32", np.dtype(np.int32)),
    "TYPE_INT64": ("INT64", np.dtype(np.int64)),
    "TYPE_FP16": ("FP16", np.dtype(np.float16)),
    "TYPE_FP32": ("FP32", np.dtype(np.float32)),
    "TYPE_FP64": ("FP64", np.dtype(np.float64)),
    "TYPE_STRING": ("BYTES", np.dtype(object)),
    "TYPE_BF16": ("BF16", None),
}
_FALSE_TRUE = {
    "int32_false_true": "TYPE_INT32",
    "fp32_false_true": "TYPE_FP32",
    "bool_false_true": "TYPE_BOOL",
}
_CORRID_TYPES = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")
# The model file a backend that rnndeploy serves looks for in a version folder (no default_model_filename)
DEFAULT_MODEL_FILES = {"onnxruntime": "model.onnx", "onnxruntime_onnx": "model.onnx", "python": "model.py"}


class RepositoryError(ValueError):
    """A model repository or ``config.pbtxt`` that cannot be served, with the file, the field and the problem."""


def data_type(value: int) -> str:
    """Triton's name of a ``DataType`` enum value: ``"TYPE_FP32"``."""
    return mc.DataType.Name(value)


@dataclass(frozen=True)
class Control:
    """A sequence-batcher control: the model input ``name`` that carries ``kind`` for each request.

    START/READY/END carry ``false_true`` (the input's value for false and for true) in ``data_type``
    (``TYPE_INT32``, ``TYPE_FP32`` or ``TYPE_BOOL``); CORRID carries the correlation ID in ``data_type``.
    """

    name: str
    kind: str
    data_type: str
    false_true: tuple | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One model folder: its ``ModelConfig`` (checked) and its version folders."""

    name: str
    folder: Path
    config: mc.ModelConfig
    versions: tuple[int, ...]  # every numbered version folder, ascending
    ready_versions: tuple[int, ...]  # those the version policy serves (default: the latest one)

    @property
    def kind(self) -> str:
        """The backend, else the platform: ``"onnxruntime"``, ``"python"``..."""
        return self.config.backend or self.config.platform

    @property
    def sequence_batching(self) -> mc.ModelSequenceBatching | None:
        return self.config.sequence_batching if self.config.HasField("sequence_batching") else None

    @property
    def controls(self) -> list[Control]:
        """The sequence-batcher control inputs, one `Control` per ``control`` block."""
        seq = self.sequence_batching
        out = []
        for control_input in seq.control_input if seq is not None else ():
            for c in control_input.control:
                kind = mc.ModelSequenceBatching.Control.Kind.Name(c.kind)
                if kind == "CONTROL_SEQUENCE_CORRID":
                    out.append(Control(control_input.name, kind, data_type(c.data_type)))
                else:
                    field = next(f for f in _FALSE_TRUE if getattr(c, f))
                    out.append(
                        Control(control_input.name, kind, _FALSE_TRUE[field], tuple(getattr(c, field)))
                    )
        return out

    @property
    def idle_timeout_us(self) -> int:
        seq = self.sequence_batching
        return (seq.max_sequence_idle_microseconds if seq is not None else 0) or DEFAULT_IDLE_US

    @property
    def max_queue_delay_us(self) -> int:
        seq = self.sequence_batching
        strategy = None if seq is None else seq.WhichOneof("strategy_choice")
        return 0 if strategy is None else getattr(seq, strategy).max_queue_delay_microseconds

    def model_file(self, version: int) -> Path:
        """The model file of ``version``: ``default_model_filename`` or the backend's usual name."""
        if version not in self.versions:
            raise RepositoryError(
                f"{self.folder}: model {self.name!r} has no version {version}; versions: {list(self.versions)}"
            )
        filename = self.config.default_model_filename or DEFAULT_MODEL_FILES.get(self.kind)
        if filename is None:
            raise RepositoryError(
                f"{self.folder / CONFIG_FILE}: backend {self.kind!r} has no usual model file name; set "
                "default_model_filename"
            )
        return self.folder / str(version) / filename


def _bounded(text: str, source: str) -> None:
    """Refuse blocks nested deeper than ``MAX_NESTING`` before protobuf's recursive parser sees them."""
    depth = 0
    for match in _BLOCKS.finditer(text):
        if match.group(1):
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, match.start()) + 1
                raise RepositoryError(
                    f"{source}: line {line}: blocks nested more than {MAX_NESTING} deep; ModelConfig has no "
                    "such nesting"
                )
        elif match.group(2):
            depth -= 1


def parse_config(text: str, source: str = CONFIG_FILE) -> mc.ModelConfig:
    """``config.pbtxt`` text as Triton's ``ModelConfig``, its size and nesting bounded and its values checked.

    Raises:
        RepositoryError: naming ``source``, the field (or the line) and the problem.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise RepositoryError(
            f"{source}: {len(text)} characters, over the {MAX_CONFIG_BYTES} a config may have"
        )
    _bounded(text, source)
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        message = re.sub(r"^\d+:\d+ : ", "", str(error))
        unknown = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', message)
        if unknown is not None:
            fields = descriptor_pool.Default().FindMessageTypeByName(unknown[1]).fields_by_name
            close = difflib.get_close_matches(unknown[2], list(fields), n=1)
            message += f" unknown field{f' (did you mean {close[0]!r}?)' if close else ''}"
        raise RepositoryError(f"{source}: line {error.GetLine()}: {message}") from None
    _check(config, source)
    return config


def _check(config: mc.ModelConfig, source: str) -> None:
    def fail(field: str, problem: str) -> RepositoryError:
        return RepositoryError(f"{source}: {field}: {problem}")

    def in_range(field: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            raise fail(field, f"must be an integer in [{low}, {high}], got {value}")

    def dims(field: str, values) -> None:
        if not values or len(values) > MAX_DIMS:
            raise fail(
                field,
                f"give 1 to {MAX_DIMS} dims, -1 for an axis of any size (dims: [ -1 ]); got {list(values)}",
            )
        for d in values:
            if d != -1 and not 1 <= d <= MAX_DIM:
                raise fail(field, f"each dim must be -1 (any size) or in [1, 2**40], got {list(values)}")

    if not config.backend and not config.platform:
        raise fail("backend", 'missing: give backend (e.g. "onnxruntime", "python") or platform')
    in_range("max_batch_size", config.max_batch_size, 0, MAX_BATCH_SIZE)
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen = set()
        for i, t in enumerate(tensors):
            if not t.name:
                raise fail(f"{kind}[{i}].name", "missing; every entry needs one")
            if t.name in seen:
                raise fail(kind, f"{t.name!r} is declared twice")
            seen.add(t.name)
            if data_type(t.data_type) not in DATA_TYPES:
                raise fail(
                    f"{kind}[{i}].data_type", f"one of {', '.join(DATA_TYPES)}, got {data_type(t.data_type)}"
                )
            dims(f"{kind}[{i}].dims", t.dims)
    if config.HasField("sequence_batching"):
        seq = config.sequence_batching
        in_range(
            "sequence_batching.max_sequence_idle_microseconds",
            seq.max_sequence_idle_microseconds,
            0,
            MAX_IDLE_US,
        )
        strategy = seq.WhichOneof("strategy_choice")
        if strategy is not None:
            field = f"sequence_batching.{strategy}"
            delay = getattr(seq, strategy).max_queue_delay_microseconds
            in_range(f"{field}.max_queue_delay_microseconds", delay, 0, MAX_QUEUE_DELAY_US)
            if strategy == "oldest":
                in_range(
                    f"{field}.max_candidate_sequences", seq.oldest.max_candidate_sequences, 0, MAX_BATCH_SIZE
                )
                for size in seq.oldest.preferred_batch_size:
                    in_range(f"{field}.preferred_batch_size", size, 1, MAX_BATCH_SIZE)
        declared, kinds = {t.name for t in config.input}, set()
        for i, control_input in enumerate(seq.control_input):
            field = f"sequence_batching.control_input[{i}]"
            if not control_input.name or not control_input.control:
                raise fail(field, "needs a name and a control block")
            if control_input.name in declared:
                raise fail(
                    field,
                    f"{control_input.name!r} is also a declared input; Triton fills control inputs itself",
                )
            for c in control_input.control:
                kind = mc.ModelSequenceBatching.Control.Kind.Name(c.kind)
                if kind in kinds:
                    raise fail(field, f"{kind} is given more than once")
                kinds.add(kind)
                given = [f for f in _FALSE_TRUE if getattr(c, f)]
                if kind == "CONTROL_SEQUENCE_CORRID":
                    if given or data_type(c.data_type) not in _CORRID_TYPES:
                        raise fail(
                            field,
                            f"a CORRID control carries the ID in a data_type of {', '.join(_CORRID_TYPES)}, no false/true values",
                        )
                elif len(given) != 1 or len(getattr(c, given[0])) != 2:
                    raise fail(
                        field,
                        f"{kind} control {control_input.name!r} needs exactly one of {', '.join(_FALSE_TRUE)} with two values [false, true]",
                    )
        for i, state in enumerate(seq.state):
            if not state.input_name or not state.output_name:
                raise fail(f"sequence_batching.state[{i}]", "needs input_name and output_name")
            dims(f"sequence_batching.state[{i}].dims", state.dims)


def _ready_versions(config: mc.ModelConfig, versions: tuple[int, ...], source: str) -> tuple[int, ...]:
    policy = config.version_policy
    chosen = policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if chosen is None:
        return versions[-1:]
    if chosen == "all":
        return versions
    if chosen == "latest":
        n = policy.latest.num_versions
        if n < 1:
            raise RepositoryError(f"{source}: version_policy.latest.num_versions: must be >= 1, got {n}")
        return versions[-n:]
    missing = sorted(set(policy.specific.versions) - set(versions))
    if missing:
        raise RepositoryError(
            f"{source}: version_policy.specific.versions: versions {missing} have no folder; folders: "
            f"{list(versions)}"
        )
    return tuple(sorted(set(policy.specific.versions)))


def read_model(folder: str | Path) -> ModelEntry:
    """One model folder of a repository: ``config.pbtxt`` and the numbered version folders."""
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise RepositoryError(
            f"{folder}: no {CONFIG_FILE}; every model folder needs one (rnndeploy export --triton-repo writes it)"
        )
    versions = tuple(
        sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name))
    )
    if not versions:
        raise RepositoryError(f"{folder}: no version folder; put the model in {folder / '1'}/ (1, 2, ...)")
    try:
        with config_file.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        text = data.decode()
    except (OSError, UnicodeDecodeError) as error:
        raise RepositoryError(f"{config_file}: cannot be read: {error}") from None
    config = parse_config(text, str(config_file))
    if config.name and config.name != folder.name:
        raise RepositoryError(
            f"{config_file}: name {config.name!r} differs from the model's folder {folder.name!r}; Triton requires "
            "them equal: rename one, or leave name out"
        )
    config.name = folder.name
    return ModelEntry(
        folder.name, folder, config, versions, _ready_versions(config, versions, str(config_file))
    )


def read_repository(root: str | Path) -> dict[str, ModelEntry]:
    """Every model of a Triton-style repository (``tritonserver --model-repository=root``), by name.

    Folders whose name starts with ``.`` are skipped, as are plain files at the top.
    """
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"{root}: not a folder; a model repository is a folder of model folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RepositoryError(f"{root}: no model folder (expected {root}/<model>/config.pbtxt)")
    return {p.name: read_model(p) for p in folders}
