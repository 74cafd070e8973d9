"""rnndeploy.server.repository: config.pbtxt read as Triton's ModelConfig message (tritonclient's schema, protobuf's
text format), every value the server uses range-checked, hostile configs refused before they cost anything;
errors name the file, the field (the line, for syntax) and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnndeploy import ModelConfig, SequenceModel
from rnndeploy.cli import main
from rnndeploy.export import write_triton_repository
from rnndeploy.server.repository import (
    MAX_QUEUE_DELAY_US,
    RepositoryError,
    parse_config,
    read_model,
    read_repository,
)

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from click.testing import CliRunner  # noqa: E402
from google.protobuf import text_format  # noqa: E402

MODELS = {
    "lstm-L2-embed": dict(task="lm", cell="lstm", vocab_size=11, num_layers=2),
    "gru-L1-linear": dict(task="regression", cell="gru", input_size=3, output_size=2),
}


def protobuf(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


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
    assert sorted(repository) == sorted(f"{n}-{b}" for n in MODELS for b in ("ort", "py"))
    for name, entry in repository.items():
        assert entry.name == name and entry.folder == exported / name
        assert entry.versions == entry.ready_versions == (1,)
        assert entry.config == protobuf((entry.folder / "config.pbtxt").read_text())
        start = next(c for c in entry.controls if c.kind == "CONTROL_SEQUENCE_START")
        assert (start.name, start.data_type, start.false_true) == ("START", "TYPE_INT32", (0, 1))
        model_file = entry.model_file(1)
        assert model_file.is_file() and model_file.suffix == (".py" if name.endswith("-py") else ".onnx")
    lstm = repository["lstm-L2-embed-ort"]
    assert [
        (s.input_name, list(s.dims), s.initial_state[0].zero_data) for s in lstm.sequence_batching.state
    ] == [
        ("state_h_in", [2, 5], True),
        ("state_c_in", [2, 5], True),
    ]
    assert (lstm.idle_timeout_us, lstm.max_queue_delay_us) == (3_000_000, 100)
    assert [c.name for c in repository["lstm-L2-embed-py"].controls] == ["START", "END"]
    assert not repository["gru-L1-linear-py"].sequence_batching.state


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
    assert entry.config == protobuf(SYNTAX)
    assert entry.ready_versions == (3, 7)  # latest 2
    assert entry.model_file(7) == folder / "7" / "rnn.onnx"
    assert (entry.max_queue_delay_us, entry.idle_timeout_us) == (250, 1_000_000)
    assert [(c.name, c.kind, c.data_type, c.false_true) for c in entry.controls] == [
        ("S", "CONTROL_SEQUENCE_START", "TYPE_FP32", (0.0, 1.0)),
        ("R", "CONTROL_SEQUENCE_READY", "TYPE_BOOL", (False, True)),
        ("C", "CONTROL_SEQUENCE_CORRID", "TYPE_STRING", None),
    ]


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
        # 0, 007, v3, latest and digits of other scripts are not versions
        for sub in ("1", "2", "10", "0", "007", "v3", "latest", "\u0661", "\uff13"):
            (folder / sub).mkdir(parents=True)
        (folder / "labels.txt").write_text("a\n")
        (folder / "config.pbtxt").write_text(f'backend: "python"\n{policy}\n')
    (repo / ".cache").mkdir()  # hidden: skipped
    (repo / "README.md").write_text("not a model\n")
    repository = read_repository(repo)
    assert sorted(repository) == sorted(policies)
    ready = {name: entry.ready_versions for name, entry in repository.items()}
    assert ready == {"latest1": (10,), "latest2": (2, 10), "all": (1, 2, 10), "specific": (1, 10)}
    assert all(entry.versions == (1, 2, 10) for entry in repository.values())
    assert repository["all"].model_file(2) == repo / "all" / "2" / "model.py"
    assert repository["all"].config.max_batch_size == 0 and not repository["all"].config.input
    with pytest.raises(RepositoryError, match=r"has no version 3; versions: \[1, 2, 10\]"):
        repository["all"].model_file(3)


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

# (id, text replaced -> replacement, line (syntax errors) or None, what the message says)
BAD = [
    ("misspelled-field", ("max_batch_size: 8", "max_batch_sise: 8"), 3, "unknown field (did you mean 'max_batch_size'?)"),
    ("not-an-integer", ("max_batch_size: 8", "max_batch_size: eight"), 3, "Couldn't parse integer: eight"),
    ("negative-batch", ("max_batch_size: 8", "max_batch_size: -1"), None, "max_batch_size: must be an integer in [0, 65536], got -1"),
    ("unquoted-string", ('backend: "onnxruntime"', "backend: onnxruntime"), 2, "Expected string"),
    ("unknown-type", ("TYPE_FP32 dims: [ -1, 3 ]", "TYPE_FLOAT dims: [ -1, 3 ]"), 4, "TYPE_FLOAT"),
    ("no-dims", (" dims: [ -1, 3 ]", ""), None, "input[0].dims: give 1 to 16 dims"),
    ("zero-dim", ("dims: [ -1, 3 ]", "dims: [ 0, 3 ]"), None, "input[0].dims: each dim must be -1 (any size) or in [1, 2**40], got [0, 3]"),
    ("twice", ('name: "m"', 'name: "m" name: "n"'), 1, 'should not have multiple "name" fields'),
    ("duplicate-input", ("output [ { name: \"output\"", "input [ { name: \"input\""), None, "input: 'input' is declared twice"),
    ("no-backend", ('backend: "onnxruntime"', ""), None, "backend: missing: give backend"),
    ("two-strategies", ("  oldest {", "  direct { }\n  oldest {"), 12, "oneof"),
    ("control-no-values", ("int32_false_true: [ 0, 1 ] ", ""), None, "control_input[0]: CONTROL_SEQUENCE_START control 'START' needs exactly one of"),
    ("control-one-value", ("int32_false_true: [ 0, 1 ]", "int32_false_true: [ 1 ]"), None, "with two values [false, true]"),
    ("control-bad-kind", ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_BEGIN"), 8, "CONTROL_SEQUENCE_BEGIN"),
    ("control-is-input", ('name: "START"', 'name: "input"'), None, "'input' is also a declared input"),
    ("state-no-output", ('output_name: "h_out" ', ""), None, "state[0]: needs input_name and output_name"),
    ("unclosed", ("\n}\n", "\n"), 11, 'Expected "}"'),
    ("stray", ("max_batch_size: 8", "max_batch_size: 8 }"), 3, "Expected identifier or number, got }"),
    ("bad-char", ("max_batch_size: 8", "max_batch_size: 8 @"), 3, "Expected identifier or number, got @"),
    ("block-for-value", ("max_batch_size: 8", "max_batch_size { }"), 3, 'Expected ":"'),
    ("queue-delay-1e20", ("max_queue_delay_microseconds: 100", "max_queue_delay_microseconds: 1e20"), 11, "Couldn't parse integer: 1e20"),
    ("queue-delay-10**20", ("max_queue_delay_microseconds: 100", "max_queue_delay_microseconds: 100000000000000000000"), 11, "Value out of range"),
    ("queue-delay-2**63", ("max_queue_delay_microseconds: 100", f"max_queue_delay_microseconds: {2**63}"), None, f"sequence_batching.oldest.max_queue_delay_microseconds: must be an integer in [0, {MAX_QUEUE_DELAY_US}], got {2**63}"),
    ("idle-2**63", ("max_sequence_idle_microseconds: 5000000", f"max_sequence_idle_microseconds: {2**63}"), None, "sequence_batching.max_sequence_idle_microseconds: must be an integer in"),
    ("huge-dim", ("dims: [ -1, 3 ]", "dims: [ -1, 1099511627777 ]"), None, "input[0].dims: each dim must be"),
    ("nested", ("max_batch_size: 8", "parameters " + "{ " * 5000 + "}" * 5000), 3, "blocks nested more than 16 deep"),
    ("44MB", ("max_batch_size: 8", "max_batch_size: 8\n" + "# padding\n" * 4_400_000), None, "characters, over the 1048576 a config may have"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_errors_name_the_file_field_and_problem(case, tmp_path):
    _, (old, new), line, message = case
    assert old in GOOD, old
    text = GOOD.replace(old, new, 1)
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(text)
    with pytest.raises(RepositoryError) as error:
        read_model(folder)
    where = f"{folder / 'config.pbtxt'}: " + ("" if line is None else f"line {line}: ")
    assert str(error.value).startswith(where), str(error.value)[:300]
    assert message in str(error.value), str(error.value)[:300]


@pytest.mark.parametrize("case", ["nested", "44MB", "queue-delay-1e20", "queue-delay-2**63"])
def test_serve_stops_on_a_hostile_config_naming_it(case, tmp_path):
    (old, new), message = next((b[1], b[3]) for b in BAD if b[0] == case)
    folder = tmp_path / "repo" / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(GOOD.replace(old, new, 1))
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "repo"), "--port", "0"])
    assert result.exit_code == 1 and "config.pbtxt" in result.output and message in result.output, (
        result.output[:300]
    )
    assert "Traceback" not in result.output


def test_the_good_config_reads_as_protobuf_reads_it():
    assert parse_config(GOOD, "m/config.pbtxt") == protobuf(GOOD)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("no-config", r"m: no config\.pbtxt; every model folder needs one"),
        ("no-version", r"m: no version folder; put the model in .*m/1/"),
        ("other-name", r"config\.pbtxt: name 'other' differs from the model's folder 'm'"),
        ("not-a-folder", r"repo: not a folder"),
        ("empty", r"repo: no model folder"),
        (
            "missing-specific",
            r"config\.pbtxt: version_policy\.specific\.versions: versions \[2\] have no folder",
        ),
        ("non-ascii-version", r"m: no version folder; put the model in .*m/1/"),
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
        if layout == "non-ascii-version":
            (folder / "\u0661").mkdir()  # ARABIC-INDIC DIGIT ONE: str.isdigit() is true, not a version
        elif layout != "no-version":
            (folder / "1").mkdir()
        if layout != "no-config":
            name = "other" if layout == "other-name" else "m"
            policy = (
                "version_policy { specific { versions: [ 1, 2 ] } }" if layout == "missing-specific" else ""
            )
            (folder / "config.pbtxt").write_text(f'name: "{name}" backend: "python"\n{policy}\n')
    with pytest.raises(RepositoryError, match=message):
        read_repository(repo)


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
    assert parse_config(text, "generated/config.pbtxt") == config
