"""rnndeploy.server.repository against Triton's own schema: tritonclient's ModelConfig protobuf reads every
config here too, and both readings must agree; errors name the file, the line and the field."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.export import write_triton_repository
from rnndeploy.server.repository import (
    ModelEntry,
    RepositoryError,
    parse_config,
    read_model,
    read_repository,
)

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

MODELS = {
    "lstm-L2-embed": dict(task="lm", cell="lstm", vocab_size=11, num_layers=2),
    "gru-L1-linear": dict(task="regression", cell="gru", input_size=3, output_size=2),
}


def protobuf(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def assert_matches_protobuf(entry: ModelEntry, text: str) -> None:
    """Every field the reader returns equals Triton's protobuf reading of the same text."""
    pb = protobuf(text)
    enum = model_config_pb2.DataType.Name
    kind = model_config_pb2.ModelSequenceBatching.Control.Kind.Name
    assert (entry.backend, entry.platform, entry.max_batch_size) == (
        pb.backend,
        pb.platform,
        pb.max_batch_size,
    )
    assert entry.default_model_filename == pb.default_model_filename
    for ours, theirs in ((entry.inputs, pb.input), (entry.outputs, pb.output)):
        assert [(t.name, t.data_type, t.dims) for t in ours] == [
            (t.name, enum(t.data_type), tuple(t.dims)) for t in theirs
        ]
    assert [t.optional for t in entry.inputs] == [t.optional for t in pb.input]
    if not pb.HasField("sequence_batching"):
        assert entry.sequence_batching is None
        return
    seq, pseq = entry.sequence_batching, pb.sequence_batching
    strategy = pseq.WhichOneof("strategy_choice") or "direct"
    assert seq.strategy == strategy
    assert seq.max_sequence_idle_us == (pseq.max_sequence_idle_microseconds or 1_000_000)
    assert seq.max_queue_delay_us == getattr(pseq, strategy).max_queue_delay_microseconds
    if strategy == "oldest":
        assert seq.max_candidate_sequences == (pseq.oldest.max_candidate_sequences or None)
        assert seq.preferred_batch_sizes == tuple(pseq.oldest.preferred_batch_size)
    theirs = []
    for ci in pseq.control_input:
        for c in ci.control:
            values = list(c.int32_false_true) or list(c.fp32_false_true) or list(c.bool_false_true)
            theirs.append((ci.name, kind(c.kind), tuple(values) or None))
    assert [(c.name, c.kind, c.false_true) for c in seq.controls] == theirs
    assert [(s.input_name, s.output_name, s.data_type, s.dims) for s in seq.states] == [
        (s.input_name, s.output_name, enum(s.data_type), tuple(s.dims)) for s in pseq.state
    ]
    assert [s.initial for s in seq.states] == [
        "zero" if s.initial_state and s.initial_state[0].zero_data else "none" for s in pseq.state
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A repository as `rnndeploy export --triton-repo` writes it: both backends, two models each."""
    repo = tmp_path_factory.mktemp("exported")
    for name, kwargs in MODELS.items():
        model = SequenceModel(ModelConfig(embed_dim=6, hidden_size=5, **kwargs)).eval()
        write_triton_repository(model, repo, f"{name}-ort", max_batch_size=8, idle_timeout_us=3_000_000)
        write_triton_repository(model, repo, f"{name}-py", backend="python", max_batch_size=8)
    return repo


def test_exported_repository_reads_as_tritons_schema_reads_it(exported):
    repository = read_repository(exported)
    assert sorted(repository.models) == sorted(f"{n}-{b}" for n in MODELS for b in ("ort", "py"))
    for name, entry in repository.models.items():
        assert entry.name == name and entry.folder == exported / name
        assert entry.versions == entry.ready_versions == (1,)
        assert_matches_protobuf(entry, (entry.folder / "config.pbtxt").read_text())
        seq = entry.sequence_batching
        start = seq.control("CONTROL_SEQUENCE_START")
        assert (start.name, start.data_type, start.false_true) == ("START", "TYPE_INT32", (0, 1))
        model_file = entry.model_file(1)
        assert model_file.is_file() and model_file.suffix == (".py" if name.endswith("-py") else ".onnx")
    lstm = repository.models["lstm-L2-embed-ort"]
    assert [(s.input_name, s.dims, s.initial) for s in lstm.sequence_batching.states] == [
        ("state_h_in", (2, 5), "zero"),
        ("state_c_in", (2, 5), "zero"),
    ]
    assert lstm.sequence_batching.max_sequence_idle_us == 3_000_000
    assert (lstm.inputs[0].datatype, lstm.inputs[0].dtype) == ("INT64", np.dtype(np.int64))
    assert (
        repository.models["lstm-L2-embed-py"].sequence_batching.control("CONTROL_SEQUENCE_END").name == "END"
    )
    assert repository.models["gru-L1-linear-py"].sequence_batching.states == ()


SYNTAX = """
# every way the text format allows: comments, ':' before blocks, <> blocks, ';' and ',' separators,
# single quotes, adjacent strings, repeated fields and [ ] lists, hex and signed numbers
name: 'multi' "model"
platform: "onnxruntime_onnx"
max_batch_size: 0x10;
default_model_filename: "rnn.onnx"
input { name: "x" data_type: TYPE_FP32 dims: -1 dims: 3 optional: true }
input: < name: "lengths", data_type: TYPE_INT32, dims: [ 1 ] >
output [ { name: "y"; data_type: TYPE_FP16; dims: [ -1, 2 ] }, { name: "p" data_type: TYPE_BOOL dims: [1] } ]
instance_group [ { kind: KIND_CPU count: 2 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
version_policy: { latest { num_versions: 2 } }
sequence_batching {
  direct { max_queue_delay_microseconds: 250 }
  control_input: [
    { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0.0, 1e0 ] } ] },
    { name: "R" control { kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] } },
    { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }
  ]
  state { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 4 ] }
}
"""


def test_every_text_format_spelling_reads_as_protobuf_reads_it(tmp_path):
    folder = tmp_path / "multimodel"
    for version in ("1", "3", "7"):
        (folder / version).mkdir(parents=True)
    (folder / "config.pbtxt").write_text(SYNTAX)
    entry = read_model(folder)
    assert entry.name == "multimodel" == protobuf(SYNTAX).name  # 'multi' "model": one string
    assert_matches_protobuf(entry, SYNTAX)
    assert entry.ready_versions == (3, 7)  # latest 2
    assert entry.model_file(7) == folder / "7" / "rnn.onnx"
    seq = entry.sequence_batching
    assert (seq.strategy, seq.max_queue_delay_us, seq.max_sequence_idle_us) == ("direct", 250, 1_000_000)
    corrid = seq.control("CONTROL_SEQUENCE_CORRID")
    assert (corrid.name, corrid.data_type, corrid.false_true) == ("C", "TYPE_STRING", None)
    assert seq.control("CONTROL_SEQUENCE_READY").false_true == (False, True)
    assert seq.control("CONTROL_SEQUENCE_END") is None
    assert [s.initial for s in seq.states] == ["none"]


def test_repository_layout_models_versions_and_policies(tmp_path):
    repo = tmp_path / "repo"
    policies = {
        "latest1": "",
        "latest2": "version_policy { latest { num_versions: 2 } }",
        "all": "version_policy { all { } }",
        "specific": "version_policy { specific { versions: [ 1, 10 ] } }",
    }
    for name, policy in policies.items():
        folder = repo / name
        for sub in ("1", "2", "10", "0", "007", "v3", "latest"):  # 0, 007, v3, latest are not versions
            (folder / sub).mkdir(parents=True)
        (folder / "labels.txt").write_text("a\n")
        (folder / "config.pbtxt").write_text(f'backend: "python"\n{policy}\n')
    (repo / ".cache").mkdir()  # hidden: skipped
    (repo / "README.md").write_text("not a model\n")
    repository = read_repository(repo)
    assert sorted(repository.models) == sorted(policies)
    ready = {name: entry.ready_versions for name, entry in repository.models.items()}
    assert ready == {"latest1": (10,), "latest2": (2, 10), "all": (1, 2, 10), "specific": (1, 10)}
    assert all(entry.versions == (1, 2, 10) for entry in repository.models.values())
    assert repository.models["all"].model_file(2) == repo / "all" / "2" / "model.py"
    assert repository.models["all"].max_batch_size == 0 and repository.models["all"].inputs == ()
    with pytest.raises(RepositoryError, match=r"has no version 3; versions: \[1, 2, 10\]"):
        repository.models["all"].model_file(3)


GOOD = """name: "m"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ -1, 2 ] } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]
  state [ { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 1, 5 ]
            initial_state: { name: "z" data_type: TYPE_FP32 dims: [ 1, 5 ] zero_data: true } } ]
  oldest { max_candidate_sequences: 8 preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
}
"""

# (id, text replaced -> replacement, line, what the message says, protobuf rejects it too)
BAD = [
    ("misspelled-field", ("max_batch_size: 8", "max_batch_sise: 8"), 3, "did you mean 'max_batch_size'", True),
    ("not-an-integer", ("max_batch_size: 8", "max_batch_size: eight"), 3, "max_batch_size: expected an integer", True),
    ("negative-batch", ("max_batch_size: 8", "max_batch_size: -1"), 3, "expected an integer >= 0, got -1", False),
    ("unquoted-string", ('backend: "onnxruntime"', "backend: onnxruntime"), 2, "backend: expected a quoted", True),
    ("unknown-type", ("TYPE_FP32 dims: [ -1, 3 ]", "TYPE_FLOAT dims: [ -1, 3 ]"), 4, "input[0].data_type", True),
    ("no-dims", (" dims: [ -1, 3 ]", ""), 4, "input[0].dims: missing", False),
    ("zero-dim", ("dims: [ -1, 3 ]", "dims: [ 0, 3 ]"), 4, "an axis of size 0", False),
    ("twice", ('name: "m"', 'name: "m" name: "n"'), 1, "name: given more than once", True),
    ("duplicate-input", ("output [ { name: \"output\"", "input [ { name: \"input\""), 4, "'input' is declared twice", False),
    ("no-backend", ('backend: "onnxruntime"', ""), 1, 'backend: missing: give backend', False),
    ("two-strategies", ("  oldest {", "  direct { }\n  oldest {"), 12, "give one strategy", True),
    ("control-no-values", ("int32_false_true: [ 0, 1 ] ", ""), 8, "needs exactly one of int32_false_true", False),
    ("control-one-value", ("int32_false_true: [ 0, 1 ]", "int32_false_true: [ 1 ]"), 8, "expected two values", False),
    ("control-bad-kind", ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_BEGIN"), 8, "control[0].kind: expected one of", True),
    ("control-is-input", ('name: "START"', 'name: "input"'), 8, "'input' is also a declared input", False),
    ("state-no-output", ('output_name: "h_out" ', ""), 9, "state[0].output_name: missing", False),
    ("state-initial", ("zero_data: true", ""), 10, "initial_state needs zero_data", False),
    ("idle-zero", ("max_sequence_idle_microseconds: 5000000", "max_sequence_idle_microseconds: 0"), 7, ">= 1, got 0", False),
    ("unclosed", ("\n}\n", "\n"), 12, "unexpected end of file, expected '}'", True),
    ("stray", ("max_batch_size: 8", "max_batch_size: 8 }"), 3, "expected a field name, got '}'", True),
    ("bad-char", ("max_batch_size: 8", "max_batch_size: 8 @"), 3, "unexpected character '@'", True),
    ("block-for-value", ("max_batch_size: 8", "max_batch_size { }"), 3, "expected a value, got a { ... } block", True),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_errors_name_the_file_line_and_field(case, tmp_path):
    _, (old, new), line, message, protobuf_rejects = case
    assert old in GOOD, old
    text = GOOD.replace(old, new, 1)
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text)
    with pytest.raises(RepositoryError) as error:
        read_model(folder)
    assert str(error.value).startswith(f"{folder / 'config.pbtxt'}: line {line}: "), str(error.value)
    assert message in str(error.value), str(error.value)
    if protobuf_rejects:  # the text is wrong for Triton's schema too, not only for this reader
        with pytest.raises(text_format.ParseError):
            protobuf(text)


def test_the_good_config_reads_as_protobuf_reads_it(tmp_path):
    entry = parse_config(GOOD, "m/config.pbtxt")
    assert_matches_protobuf(entry, GOOD)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("no-config", r"m: no config\.pbtxt; every model folder needs one"),
        ("no-version", r"m: no version folder; put the model in .*m/1/"),
        ("other-name", r"config\.pbtxt: name 'other' differs from the model's folder 'm'"),
        ("not-a-folder", r"repo: not a folder"),
        ("empty", r"repo: no model folder"),
        ("missing-specific", r"line 2: version_policy\.specific\.versions: versions \[2\] have no folder"),
    ],
)
def test_layout_errors_say_what_to_do(layout, message, tmp_path):
    repo = tmp_path / "repo"
    folder = repo / "m"
    if layout == "not-a-folder":
        repo.write_text("")
    elif layout == "empty":
        repo.mkdir()
    else:
        folder.mkdir(parents=True)
        if layout != "no-version":
            (folder / "1").mkdir()
        if layout != "no-config":
            name = "other" if layout == "other-name" else "m"
            policy = (
                "version_policy { specific { versions: [ 1, 2 ] } }" if layout == "missing-specific" else ""
            )
            (folder / "config.pbtxt").write_text(f'name: "{name}" backend: "python"\n{policy}\n')
    with pytest.raises(RepositoryError, match=message):
        read_repository(repo)


def test_unknown_control_kind_is_refused_by_name():
    entry = parse_config(GOOD)
    with pytest.raises(ValueError, match=re.escape("kind must be one of CONTROL_SEQUENCE_START")):
        entry.sequence_batching.control("START")


# --- any config Triton's schema writes reads back the same ---

_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
_DIMS = st.lists(st.sampled_from([-1, 1, 2, 3, 8]), min_size=1, max_size=3)


@st.composite
def model_configs(draw):
    mc = model_config_pb2
    config = mc.ModelConfig(
        name=draw(st.one_of(st.just(""), _NAMES)),
        backend=draw(st.sampled_from(["onnxruntime", "python"])),
        max_batch_size=draw(st.integers(0, 64)),
    )
    names = draw(st.lists(_NAMES, min_size=2, max_size=8, unique=True))
    n_in = draw(st.integers(1, len(names) - 1))
    types = sorted(set(mc.DataType.keys()) - {"TYPE_INVALID"})
    for i, name in enumerate(names):
        t = config.input.add() if i < n_in else config.output.add()
        t.name, t.data_type = name, mc.DataType.Value(draw(st.sampled_from(types)))
        t.dims.extend(draw(_DIMS))
        if i < n_in and draw(st.booleans()):
            t.optional = True
    if draw(st.booleans()):
        group = config.instance_group.add()  # not read, but must not disturb the rest
        group.kind, group.count = mc.ModelInstanceGroup.KIND_CPU, draw(st.integers(1, 4))
    if draw(st.booleans()):
        seq = config.sequence_batching
        if draw(st.booleans()):
            seq.max_sequence_idle_microseconds = draw(st.integers(1, 10**8))
        strategy = draw(st.sampled_from(["oldest", "direct", None]))
        if strategy == "oldest":
            seq.oldest.max_candidate_sequences = draw(st.integers(1, 64))
            seq.oldest.preferred_batch_size.extend(draw(st.lists(st.integers(1, 64), max_size=3)))
            seq.oldest.max_queue_delay_microseconds = draw(st.integers(0, 10**6))
        elif strategy == "direct":
            seq.direct.max_queue_delay_microseconds = draw(st.integers(0, 10**6))
        kinds = mc.ModelSequenceBatching.Control
        for kind in draw(st.lists(st.sampled_from(["START", "END", "READY", "CORRID"]), unique=True)):
            control_input = seq.control_input.add()
            control_input.name = f"ctl_{kind}"
            control = control_input.control.add()
            control.kind = kinds.Kind.Value(f"CONTROL_SEQUENCE_{kind}")
            if kind == "CORRID":
                control.data_type = mc.DataType.Value(draw(st.sampled_from(["TYPE_UINT64", "TYPE_STRING"])))
                continue
            field = draw(st.sampled_from(["int32_false_true", "fp32_false_true", "bool_false_true"]))
            values = {
                "int32_false_true": [0, 1],
                "fp32_false_true": [0.0, 0.5],
                "bool_false_true": [False, True],
            }
            getattr(control, field).extend(values[field])
        for i in range(draw(st.integers(0, 2))):
            state = seq.state.add()
            state.input_name, state.output_name = f"s{i}_in", f"s{i}_out"
            state.data_type = mc.TYPE_FP32
            state.dims.extend(draw(_DIMS))
            if draw(st.booleans()):
                initial = state.initial_state.add()
                initial.name, initial.data_type, initial.zero_data = "zeros", mc.TYPE_FP32, True
                initial.dims.extend(state.dims)
    return config


@settings(max_examples=60, deadline=None)
@given(config=model_configs(), one_line=st.booleans(), short_lists=st.booleans())
def test_any_config_written_by_tritons_schema_reads_back(config, one_line, short_lists):
    text = text_format.MessageToString(
        config, as_one_line=one_line, use_short_repeated_primitives=short_lists
    )
    entry = parse_config(text, "generated/config.pbtxt")
    assert entry.name == config.name
    assert_matches_protobuf(entry, text)
