"""A Triton Inference Server model repository read into plain dataclasses (numpy only; no protobuf, no Triton).

The layout is Triton's: one folder per model holding ``config.pbtxt`` (``ModelConfig`` in protobuf text format)
and numbered version folders::

    repo/<model>/config.pbtxt
    repo/<model>/<version>/<model file>      version: 1, 2, ... (other names, and names starting with 0,
                                             are not versions)

:func:`read_repository` reads every model, :func:`read_model` one folder, :func:`parse_config` the text of one
``config.pbtxt``. What is read: the name, backend or platform, ``max_batch_size``, inputs and outputs,
``version_policy`` and ``default_model_filename``, and ``sequence_batching`` (strategy, idle timeout, queue
delay, candidate sequences, control inputs, implicit state). Other ModelConfig fields are checked for their
names and syntax only. Every error is a :class:`RepositoryError` naming the file, the line and the field.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.pbtxt"
DEFAULT_IDLE_US = 1_000_000  # Triton's max_sequence_idle_microseconds when the config gives none

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
CONTROL_KINDS = (
    "CONTROL_SEQUENCE_START",
    "CONTROL_SEQUENCE_READY",
    "CONTROL_SEQUENCE_END",
    "CONTROL_SEQUENCE_CORRID",
)
# The model file a backend looks for in a version folder when default_model_filename is not set
DEFAULT_MODEL_FILES = {
    "onnxruntime": "model.onnx",
    "onnxruntime_onnx": "model.onnx",
    "python": "model.py",
    "tensorrt": "model.plan",
    "tensorrt_plan": "model.plan",
    "pytorch": "model.pt",
    "pytorch_libtorch": "model.pt",
    "openvino": "model.xml",
    "tensorflow": "model.savedmodel",
    "tensorflow_savedmodel": "model.savedmodel",
    "tensorflow_graphdef": "model.graphdef",
}

# Field names of the ModelConfig messages (Triton's model_config.proto), for "unknown field" errors
_MODEL_FIELDS = frozenset(
    "name platform backend runtime version_policy max_batch_size input output batch_input "
    "batch_output optimization dynamic_batching sequence_batching ensemble_scheduling instance_group "
    "default_model_filename cc_model_filenames metric_tags parameters model_warmup model_operations "
    "model_transaction_policy model_repository_agents response_cache".split()
)
_INPUT_FIELDS = frozenset(
    "name data_type format dims reshape is_shape_tensor allow_ragged_batch optional "
    "is_non_linear_format_io".split()
)
_OUTPUT_FIELDS = frozenset(
    "name data_type dims reshape label_filename is_shape_tensor is_non_linear_format_io".split()
)
_SEQUENCE_FIELDS = frozenset(
    "direct oldest max_sequence_idle_microseconds control_input state iterative_sequence".split()
)
_OLDEST_FIELDS = frozenset(
    "max_candidate_sequences preferred_batch_size max_queue_delay_microseconds preserve_ordering".split()
)
_DIRECT_FIELDS = frozenset("max_queue_delay_microseconds minimum_slot_utilization".split())
_CONTROL_INPUT_FIELDS = frozenset("name control".split())
_CONTROL_FIELDS = frozenset("kind int32_false_true fp32_false_true bool_false_true data_type".split())
_STATE_FIELDS = frozenset(
    "input_name output_name data_type dims initial_state use_same_buffer_for_input_output "
    "use_growable_memory".split()
)
_INITIAL_STATE_FIELDS = frozenset("data_type dims zero_data data_file name".split())
_VERSION_POLICY_FIELDS = frozenset("latest all specific".split())


class RepositoryError(ValueError):
    """A model repository or ``config.pbtxt`` that cannot be served, with the file, line and field."""


# --- the dataclasses ---


@dataclass(frozen=True)
class TensorConfig:
    """One model input or output as the config declares it.

    ``dims`` leaves out the batch axis when the model's ``max_batch_size > 0`` (requests then carry
    ``[batch, *dims]``); ``-1`` is an axis of any size.
    """

    name: str
    data_type: str  # Triton's name, "TYPE_FP32"
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def datatype(self) -> str:
        """The KServe v2 datatype on the wire: ``"FP32"``, ``"INT64"``, ``"BYTES"``..."""
        return DATA_TYPES[self.data_type][0]

    @property
    def dtype(self) -> np.dtype | None:
        return DATA_TYPES[self.data_type][1]


@dataclass(frozen=True)
class Control:
    """A sequence-batcher control: the model input ``name`` that carries ``kind`` for each request.

    START/READY/END carry ``false_true`` (the input's value for false and for true) in ``data_type``
    (``TYPE_INT32``, ``TYPE_FP32`` or ``TYPE_BOOL``); CORRID carries the correlation ID in ``data_type``.
    """

    name: str
    kind: str
    data_type: str
    false_true: tuple[int, int] | tuple[float, float] | tuple[bool, bool] | None = None


@dataclass(frozen=True)
class StateConfig:
    """Implicit state: Triton feeds ``output_name`` of a sequence's previous request back as ``input_name``.

    ``dims`` leaves out the batch axis as inputs do; ``initial`` is ``"zero"`` (``zero_data``), ``"file"``
    (``data_file``) or ``"none"`` (the model sees unspecified values on START and must reset itself).
    """

    input_name: str
    output_name: str
    data_type: str
    dims: tuple[int, ...]
    initial: str = "none"


@dataclass(frozen=True)
class SequenceBatching:
    """``sequence_batching``: how the server routes, batches and times out the requests of sequences."""

    strategy: str  # "direct" (a slot per sequence) or "oldest" (batches of the oldest sequences' requests)
    max_sequence_idle_us: int
    max_queue_delay_us: int = 0
    max_candidate_sequences: int | None = None  # oldest only
    preferred_batch_sizes: tuple[int, ...] = ()  # oldest only
    controls: tuple[Control, ...] = ()
    states: tuple[StateConfig, ...] = ()

    def control(self, kind: str) -> Control | None:
        """The control of ``kind`` (``"CONTROL_SEQUENCE_START"``...), or ``None`` when the config has none."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
        return next((c for c in self.controls if c.kind == kind), None)


@dataclass(frozen=True)
class ModelEntry:
    """One model folder: its config and its version folders."""

    name: str
    folder: Path
    backend: str  # "" when the config names a platform instead
    platform: str
    max_batch_size: int  # 0: no batch axis; inputs and outputs are exactly `dims`
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    versions: tuple[int, ...]  # every numbered version folder, ascending
    ready_versions: tuple[int, ...]  # those the version policy serves (default: the latest one)
    default_model_filename: str = ""
    sequence_batching: SequenceBatching | None = None

    def model_file(self, version: int) -> Path:
        """The model file of ``version``: ``default_model_filename`` or the backend's usual name."""
        if version not in self.versions:
            raise RepositoryError(
                f"{self.folder}: model {self.name!r} has no version {version}; versions: {list(self.versions)}"
            )
        filename = self.default_model_filename or DEFAULT_MODEL_FILES.get(self.backend or self.platform)
        if filename is None:
            raise RepositoryError(
                f"{self.folder / CONFIG_FILE}: backend {self.backend or self.platform!r} has no usual model file "
                "name; set default_model_filename"
            )
        return self.folder / str(version) / filename


@dataclass(frozen=True)
class ModelRepository:
    root: Path
    models: dict[str, ModelEntry]  # by name, sorted


# --- protobuf text format: tokens -> (field, value, line) lists ---

_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\f\v]+|\#[^\n]*)
      | (?P<newline>\n)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<punct>[{}\[\]<>:,;-])""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "?": "?"}  # fmt: skip


@dataclass(frozen=True)
class _Scalar:
    kind: str  # "string" | "number" | "ident"
    text: str  # the token as written (a string without quotes, escapes resolved)
    line: int


@dataclass
class _Message:
    fields: list[tuple[str, _Scalar | _Message, int]]
    line: int


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), token[1:-1])


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.tokens: list[tuple[str, str, int]] = []
        line, pos = 1, 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if match is None:
                raise self.error(line, f"unexpected character {text[pos]!r}")
            kind, value = match.lastgroup, match.group()
            if kind == "newline":
                line += 1
            elif kind != "space":
                self.tokens.append((kind, value, line))
            pos = match.end()
        self.pos = 0
        self.end_line = line

    def error(self, line: int, message: str) -> RepositoryError:
        return RepositoryError(f"{self.source}: line {line}: {message}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise self.error(self.end_line, f"unexpected end of file, expected {expected or 'more'}")
        if expected is not None and token[1] != expected:
            raise self.error(token[2], f"expected {expected!r}, got {token[1]!r}")
        self.pos += 1
        return token

    def message(self, close: str | None, line: int = 1) -> _Message:
        fields: list[tuple[str, _Scalar | _Message, int]] = []
        while True:
            token = self.peek()
            if token is None:
                if close is not None:
                    raise self.error(self.end_line, f"unexpected end of file, expected {close!r}")
                return _Message(fields, line)
            if close is not None and token[1] == close:
                self.pos += 1
                return _Message(fields, line)
            kind, name, at = self.take()
            if kind != "ident":
                raise self.error(at, f"expected a field name, got {name!r}")
            colon = self.peek() is not None and self.peek()[1] == ":"
            if colon:
                self.pos += 1
            for value in self.values(name, at, colon):
                fields.append((name, value, at))
            if self.peek() is not None and self.peek()[1] in ",;":
                self.pos += 1

    def values(self, name: str, at: int, colon: bool) -> list[_Scalar | _Message]:
        token = self.peek()
        if token is None:
            raise self.error(self.end_line, f"{name}: unexpected end of file, expected a value")
        if token[1] in "{<":
            self.pos += 1
            return [self.message("}" if token[1] == "{" else ">", token[2])]
        if token[1] == "[":
            self.pos += 1
            out: list[_Scalar | _Message] = []
            while self.peek() is not None and self.peek()[1] != "]":
                out += self.values(name, at, True)
                if self.peek() is not None and self.peek()[1] == ",":
                    self.pos += 1
            self.take("]")
            return out
        if not colon:
            raise self.error(token[2], f"{name}: expected ':' or '{{' after the field name, got {token[1]!r}")
        return [self.scalar(name)]

    def scalar(self, name: str) -> _Scalar:
        kind, text, line = self.take()
        if kind == "punct" and text == "-":  # "- 1": a sign apart from its number
            kind, number, line = self.take()
            if kind not in ("number", "ident"):
                raise self.error(line, f"{name}: expected a number after '-', got {number!r}")
            return _Scalar("number" if kind == "number" else "ident", "-" + number, line)
        if kind == "string":
            parts = [_unquote(text)]
            while self.peek() is not None and self.peek()[0] == "string":  # "a" "b" is "ab"
                parts.append(_unquote(self.take()[1]))
            return _Scalar("string", "".join(parts), line)
        if kind in ("number", "ident"):
            return _Scalar(kind, text, line)
        raise self.error(line, f"{name}: expected a value, got {text!r}")


# --- text-format message -> typed values, with errors that name the field ---


class _Fields:
    def __init__(self, message: _Message, source: str, path: str, known: frozenset[str]) -> None:
        self.msg, self.source, self.path = message, source, path
        self.by_name: dict[str, list[tuple[_Scalar | _Message, int]]] = {}
        for name, value, line in message.fields:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(line, name, f"unknown field{hint}; known here: {', '.join(sorted(known))}")
            self.by_name.setdefault(name, []).append((value, line))

    def error(self, line: int, field: str, message: str) -> RepositoryError:
        where = f"{self.path}.{field}" if self.path else field
        return RepositoryError(f"{self.source}: line {line}: {where}: {message}")

    def has(self, name: str) -> bool:
        return name in self.by_name

    def line(self, name: str | None = None) -> int:
        if name is not None and name in self.by_name:
            return self.by_name[name][0][1]
        return self.msg.line

    def _one(self, name: str) -> tuple[_Scalar | _Message, int] | None:
        values = self.by_name.get(name, [])
        if len(values) > 1:
            raise self.error(values[1][1], name, "given more than once; it takes one value")
        return values[0] if values else None

    def _scalar(self, name: str, value: _Scalar | _Message, line: int) -> _Scalar:
        if isinstance(value, _Message):
            raise self.error(line, name, "expected a value, got a { ... } block")
        return value

    def string(self, name: str, default: str = "") -> str:
        found = self._one(name)
        if found is None:
            return default
        value = self._scalar(name, *found)
        if value.kind != "string":
            raise self.error(
                value.line, name, f'expected a quoted string, got {value.text}; write "{value.text}"'
            )
        return value.text

    def _int(self, name: str, value: _Scalar | _Message, line: int, minimum: int | None) -> int:
        value = self._scalar(name, value, line)
        try:
            number = int(value.text, 0) if value.kind == "number" else None
        except ValueError:
            number = None
        if number is None:
            raise self.error(value.line, name, f"expected an integer, got {value.text!r}")
        if minimum is not None and number < minimum:
            raise self.error(value.line, name, f"expected an integer >= {minimum}, got {number}")
        return number

    def integer(self, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
        found = self._one(name)
        return default if found is None else self._int(name, *found, minimum)

    def integers(self, name: str, minimum: int | None = None) -> tuple[int, ...]:
        return tuple(self._int(name, v, line, minimum) for v, line in self.by_name.get(name, []))

    def _float(self, name: str, value: _Scalar | _Message, line: int) -> float:
        value = self._scalar(name, value, line)
        text = value.text.rstrip("fF") if value.kind == "number" else value.text.lower()
        if value.kind == "ident" and text.lstrip("-") not in ("inf", "infinity", "nan"):
            raise self.error(value.line, name, f"expected a number, got {value.text!r}")
        try:
            return float(text)
        except ValueError:
            raise self.error(value.line, name, f"expected a number, got {value.text!r}") from None

    def floats(self, name: str) -> tuple[float, ...]:
        return tuple(self._float(name, v, line) for v, line in self.by_name.get(name, []))

    def _bool(self, name: str, value: _Scalar | _Message, line: int) -> bool:
        value = self._scalar(name, value, line)
        if value.text in ("true", "True", "t", "1"):
            return True
        if value.text in ("false", "False", "f", "0"):
            return False
        raise self.error(value.line, name, f"expected true or false, got {value.text!r}")

    def boolean(self, name: str, default: bool = False) -> bool:
        found = self._one(name)
        return default if found is None else self._bool(name, *found)

    def booleans(self, name: str) -> tuple[bool, ...]:
        return tuple(self._bool(name, v, line) for v, line in self.by_name.get(name, []))

    def enum(self, name: str, choices: tuple[str, ...] | list[str], default: str | None = None) -> str | None:
        found = self._one(name)
        if found is None:
            return default
        value = self._scalar(name, *found)
        if value.kind != "ident" or value.text not in choices:
            raise self.error(value.line, name, f"expected one of {', '.join(choices)}, got {value.text!r}")
        return value.text

    def messages(self, name: str, path: str, known: frozenset[str]) -> list[_Fields]:
        out = []
        for i, (value, line) in enumerate(self.by_name.get(name, [])):
            if not isinstance(value, _Message):
                raise self.error(line, name, f"expected a {{ ... }} block, got {value.text!r}")
            out.append(
                _Fields(value, self.source, f"{self.path + '.' if self.path else ''}{path}[{i}]", known)
            )
        return out

    def message(self, name: str, known: frozenset[str]) -> _Fields | None:
        found = self._one(name)
        if found is None:
            return None
        value, line = found
        if not isinstance(value, _Message):
            raise self.error(line, name, f"expected a {{ ... }} block, got {value.text!r}")
        return _Fields(value, self.source, f"{self.path + '.' if self.path else ''}{name}", known)


# --- the ModelConfig fields rnndeploy serves ---


def _dims(f: _Fields, field: str = "dims") -> tuple[int, ...]:
    if not f.has(field):
        raise f.error(f.line(), field, "missing; give the shape, -1 for an axis of any size (dims: [ -1 ])")
    dims = f.integers(field, minimum=-1)
    if 0 in dims:
        raise f.error(f.line(field), field, f"an axis of size 0 cannot carry data: {list(dims)}")
    return dims


def _required_string(f: _Fields, field: str) -> str:
    value = f.string(field)
    if not value:
        raise f.error(f.line(), field, "missing; every entry needs one")
    return value


def _tensor(f: _Fields, *, is_input: bool) -> TensorConfig:
    name = _required_string(f, "name")
    data_type = f.enum("data_type", list(DATA_TYPES))
    if data_type is None:
        raise f.error(f.line(), "data_type", f"missing for {name!r}; one of {', '.join(DATA_TYPES)}")
    return TensorConfig(name, data_type, _dims(f), f.boolean("optional") if is_input else False)


def _control(f: _Fields, name: str) -> Control:
    kind = f.enum("kind", CONTROL_KINDS, default=CONTROL_KINDS[0])  # the enum's default is START
    given = [k for k in ("int32_false_true", "fp32_false_true", "bool_false_true") if f.has(k)]
    if kind == "CONTROL_SEQUENCE_CORRID":
        if given:
            raise f.error(
                f.line(given[0]), given[0], "a CORRID control carries the ID, not false/true values"
            )
        data_type = f.enum(
            "data_type", ["TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING"]
        )
        if data_type is None:
            raise f.error(
                f.line(), "data_type", f"missing for CORRID control {name!r} (TYPE_UINT64, TYPE_STRING...)"
            )
        return Control(name, kind, data_type)
    if len(given) != 1:
        raise f.error(
            f.line(given[1] if given else None),
            "int32_false_true",
            f"{kind} control {name!r} needs exactly one of int32_false_true, fp32_false_true, bool_false_true "
            f"with two values [false, true]; got {', '.join(given) or 'none'}",
        )
    field = given[0]
    values: tuple = {
        "int32_false_true": f.integers,
        "fp32_false_true": f.floats,
        "bool_false_true": f.booleans,
    }[field](field)
    if len(values) != 2:
        raise f.error(f.line(field), field, f"expected two values [false, true], got {list(values)}")
    data_type = {
        "int32_false_true": "TYPE_INT32",
        "fp32_false_true": "TYPE_FP32",
        "bool_false_true": "TYPE_BOOL",
    }
    return Control(name, kind, data_type[field], (values[0], values[1]))


def _state(f: _Fields) -> StateConfig:
    input_name = _required_string(f, "input_name")
    output_name = _required_string(f, "output_name")
    data_type = f.enum("data_type", list(DATA_TYPES))
    if data_type is None:
        raise f.error(f.line(), "data_type", f"missing for state {input_name!r}")
    dims = _dims(f)
    initial = "none"
    for init in f.messages("initial_state", "initial_state", _INITIAL_STATE_FIELDS):
        if init.boolean("zero_data"):
            initial = "zero"
        elif init.string("data_file"):
            initial = "file"
        else:
            raise init.error(
                init.line(), "zero_data", "an initial_state needs zero_data: true or a data_file"
            )
    return StateConfig(input_name, output_name, data_type, dims, initial)


def _sequence_batching(f: _Fields) -> SequenceBatching:
    direct = f.message("direct", _DIRECT_FIELDS)
    oldest = f.message("oldest", _OLDEST_FIELDS)
    if direct is not None and oldest is not None:
        raise f.error(oldest.line(), "oldest", "give one strategy, direct or oldest, not both")
    strategy = oldest or direct
    controls = []
    for control_input in f.messages("control_input", "control_input", _CONTROL_INPUT_FIELDS):
        name = _required_string(control_input, "name")
        blocks = control_input.messages("control", "control", _CONTROL_FIELDS)
        if not blocks:
            raise control_input.error(control_input.line(), "control", f"missing for control input {name!r}")
        controls += [_control(block, name) for block in blocks]
    kinds = [c.kind for c in controls]
    for kind in CONTROL_KINDS:
        if kinds.count(kind) > 1:
            raise f.error(f.line("control_input"), "control_input", f"{kind} is given more than once")
    return SequenceBatching(
        strategy="oldest" if oldest is not None else "direct",
        max_sequence_idle_us=f.integer("max_sequence_idle_microseconds", DEFAULT_IDLE_US, minimum=1),
        max_queue_delay_us=strategy.integer("max_queue_delay_microseconds", 0, minimum=0) if strategy else 0,
        max_candidate_sequences=oldest.integer("max_candidate_sequences", None, minimum=1)
        if oldest
        else None,
        preferred_batch_sizes=oldest.integers("preferred_batch_size", minimum=1) if oldest else (),
        controls=tuple(controls),
        states=tuple(_state(s) for s in f.messages("state", "state", _STATE_FIELDS)),
    )


def _ready_versions(f: _Fields, versions: tuple[int, ...]) -> tuple[int, ...]:
    policy = f.message("version_policy", _VERSION_POLICY_FIELDS)
    if policy is None:
        return versions[-1:]
    chosen = [k for k in ("latest", "all", "specific") if policy.has(k)]
    if len(chosen) != 1:
        raise policy.error(
            policy.line(), "latest", f"give one of latest, all, specific; got {chosen or 'none'}"
        )
    if chosen[0] == "all":
        policy.message("all", frozenset())
        return versions
    if chosen[0] == "latest":
        n = policy.message("latest", frozenset({"num_versions"})).integer("num_versions", 1, minimum=1)
        return versions[-n:]
    specific = policy.message("specific", frozenset({"versions"}))
    wanted = specific.integers("versions", minimum=1)
    missing = sorted(set(wanted) - set(versions))
    if missing:
        raise specific.error(
            specific.line("versions"),
            "versions",
            f"versions {missing} have no folder; folders: {list(versions)}",
        )
    return tuple(sorted(set(wanted)))


def parse_config(text: str, source: str = CONFIG_FILE, versions: tuple[int, ...] = (1,)) -> ModelEntry:
    """The model described by ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``).

    Args:
        text: the file's text.
        source: the file, for error messages.
        versions: the model's numbered version folders (for ``version_policy``).

    Returns:
        A :class:`ModelEntry` whose ``folder`` is ``source``'s folder and whose ``name`` is the config's (empty
        when the config has none: Triton then names the model after its folder, as :func:`read_model` does).

    Raises:
        RepositoryError: naming the file, line and field of the first problem.
    """
    f = _Fields(_Parser(text, source).message(None), source, "", _MODEL_FIELDS)
    backend, platform = f.string("backend"), f.string("platform")
    if not backend and not platform:
        raise f.error(f.line(), "backend", 'missing: give backend (e.g. "onnxruntime", "python") or platform')
    max_batch_size = f.integer("max_batch_size", 0, minimum=0)
    inputs = tuple(_tensor(t, is_input=True) for t in f.messages("input", "input", _INPUT_FIELDS))
    outputs = tuple(_tensor(t, is_input=False) for t in f.messages("output", "output", _OUTPUT_FIELDS))
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise f.error(f.line(kind), kind, f"{duplicate!r} is declared twice")
    seq = f.message("sequence_batching", _SEQUENCE_FIELDS)
    sequence_batching = _sequence_batching(seq) if seq is not None else None
    if sequence_batching is not None:
        declared = {t.name for t in inputs}
        for control in sequence_batching.controls:
            if control.name in declared:
                raise seq.error(
                    seq.line("control_input"),
                    "control_input",
                    f"{control.name!r} is also a declared input; Triton fills control inputs itself",
                )
    return ModelEntry(
        name=f.string("name"),
        folder=Path(source).parent,
        backend=backend,
        platform=platform,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        versions=tuple(versions),
        ready_versions=_ready_versions(f, tuple(versions)),
        default_model_filename=f.string("default_model_filename"),
        sequence_batching=sequence_batching,
    )


def _versions(folder: Path) -> tuple[int, ...]:
    """Numbered version folders, as Triton counts them: digits only, not starting with 0."""
    return tuple(
        sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0")
    )


def read_model(folder: str | Path) -> ModelEntry:
    """One model folder of a repository: ``config.pbtxt`` and the numbered version folders."""
    folder = Path(folder)
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise RepositoryError(
            f"{folder}: no {CONFIG_FILE}; every model folder needs one (rnndeploy export --triton-repo writes it)"
        )
    versions = _versions(folder)
    if not versions:
        raise RepositoryError(f"{folder}: no version folder; put the model in {folder / '1'}/ (1, 2, ...)")
    try:
        text = config.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{config}: cannot be read: {exc}") from exc
    entry = parse_config(text, str(config), versions)
    if entry.name and entry.name != folder.name:
        raise RepositoryError(
            f"{config}: name {entry.name!r} differs from the model's folder {folder.name!r}; Triton requires "
            "them equal: rename one, or leave name out"
        )
    return replace(entry, name=folder.name, folder=folder)


def read_repository(root: str | Path) -> ModelRepository:
    """Every model of a Triton-style repository (``tritonserver --model-repository=root``).

    Folders whose name starts with ``.`` are skipped, as are plain files at the top.
    """
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"{root}: not a folder; a model repository is a folder of model folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RepositoryError(f"{root}: no model folder (expected {root}/<model>/config.pbtxt)")
    return ModelRepository(root, {p.name: read_model(p) for p in folders})
