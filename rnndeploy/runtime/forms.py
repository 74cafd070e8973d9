"""Which export form serves one-step requests: the sequence graph or the one-step graph of the same model.

``rnndeploy export`` writes a sequence graph (one ``RNN``/``LSTM``/``GRU`` node per layer, any number of steps
per call); ``export_step_graph`` writes the same model's single step as plain operators
(``metadata_props["rnndeploy.form"] == "step"``). Which one is faster for a single step depends on the cell,
sizes, batch, precision and machine, so a runtime that holds both measures them once at load time
(`choose_step_form`) and runs one-step requests through the winner, longer chunks through the sequence
graph.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from rnndeploy.runtime.errors import ModelError
from rnndeploy.runtime.providers import default_session_options, load_session

FORM_KEY = "rnndeploy.form"
FORMS = ("sequence", "step")
TIME_AXIS = "time"  # the name of the sequence graph's dynamic time dimension
# NOTE: the step graph must win by this fraction: timings of two close forms flip between loads with machine
# noise, and a tie keeps the sequence graph, which serves every request length.
DEFAULT_MARGIN = 0.03
# metadata both forms of one model carry with equal values (precision may differ: an int8 step graph can stand
# in for an fp32 sequence graph within int8's tolerance)
_SAME_MODEL_KEYS = ("rnndeploy.config", "rnndeploy.states", "rnndeploy.vocab", "rnndeploy.data_stats")


@dataclass(frozen=True)
class FormChoice:
    """The form for one-step calls, with the measured median microseconds per step (``None`` when not measured)."""

    form: str
    path: str
    sequence_us: float | None
    step_us: float | None


def pick(sequence_us: float, step_us: float, margin: float = DEFAULT_MARGIN) -> str:
    """``"step"`` when the step graph is faster than the sequence graph by more than ``margin``, else
    ``"sequence"``."""
    return "step" if step_us < (1.0 - margin) * sequence_us else "sequence"


def choose_step_form(
    sequence_path: str | os.PathLike,
    step_path: str | os.PathLike,
    *,
    prefer: str = "auto",
    batch: int = 1,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    calls: int = 50,
    blocks: int = 5,
    margin: float = DEFAULT_MARGIN,
) -> FormChoice:
    """Measures one step of both graphs of a model and returns the faster for one-step requests.

    Args:
        sequence_path: the sequence graph (``rnndeploy export``).
        step_path: the step graph of the same model (``export_step_graph`` / ``quantize_step_graph``).
        prefer: ``"auto"`` (measure), ``"sequence"`` or ``"step"`` (no measurement; both files still checked).
        batch: the batch size to time, ``[batch, 1]`` inputs with zero states.
        threads, providers: as the serving session will use them.
        calls, blocks: ``blocks`` alternating blocks of ``calls`` steps per graph; each graph's time is the
            median over its blocks of the median call.
        margin: see `pick`.

    Returns:
        A `FormChoice`; ``form`` is ``"sequence"`` or ``"step"``, ``path`` that graph's path.

    Raises:
        ModelError: a file is not loadable, ``step_path`` is not a step graph, ``sequence_path`` is one, or the
            two describe different models.
        ValueError: ``prefer``, ``batch``, ``calls`` or ``blocks`` out of range.
    """
    _check_arguments(prefer, batch, calls, blocks)
    sequence_path, step_path = os.fspath(sequence_path), os.fspath(step_path)
    options = default_session_options(threads)
    sessions = {
        "sequence": load_session(sequence_path, options, list(providers)),
        "step": load_session(step_path, options, list(providers)),
    }
    return choose_loaded(
        sessions,
        {"sequence": sequence_path, "step": step_path},
        prefer=prefer,
        batch=batch,
        calls=calls,
        blocks=blocks,
        margin=margin,
    )


def choose_loaded(
    sessions: dict[str, ort.InferenceSession],
    paths: dict[str, str],
    *,
    prefer: str = "auto",
    batch: int = 1,
    calls: int = 50,
    blocks: int = 5,
    margin: float = DEFAULT_MARGIN,
) -> FormChoice:
    """`choose_step_form` on sessions already loaded (``{"sequence": ..., "step": ...}``); ``paths`` names their
    files in messages and in the result."""
    _check_arguments(prefer, batch, calls, blocks)
    check_pair(sessions, paths["sequence"], paths["step"])
    if prefer != "auto":
        return FormChoice(prefer, paths[prefer], None, None)
    loops = {form: _step_loop(sessions[form], batch) for form in FORMS}
    medians: dict[str, list[float]] = {form: [] for form in FORMS}
    for loop in loops.values():  # warm-up: first-run allocations and prepacking
        loop(min(calls, 10))
    for _ in range(blocks):
        for form, loop in loops.items():
            medians[form].append(loop(calls))
    sequence_us, step_us = (float(np.median(medians[form])) * 1e6 for form in FORMS)
    form = pick(sequence_us, step_us, margin)
    return FormChoice(form, paths[form], sequence_us, step_us)


def _check_arguments(prefer: str, batch: int, calls: int, blocks: int) -> None:
    if prefer not in ("auto", *FORMS):
        raise ValueError(f"prefer must be 'auto', 'sequence' or 'step', got {prefer!r}")
    for name, value in (("batch", batch), ("calls", calls), ("blocks", blocks)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_pair(sessions: dict[str, ort.InferenceSession], sequence_path: str, step_path: str) -> None:
    """Refuse two graphs that are not the sequence and step graph of one model (`ModelError`, a ValueError,
    naming both files and the difference): forms, model metadata, and every input and output's name, dtype
    and shape, the step graph's time axis being 1."""
    meta = {form: s.get_modelmeta().custom_metadata_map for form, s in sessions.items()}
    if meta["step"].get(FORM_KEY) != "step":
        raise ModelError(
            f"{step_path} is not a step graph (metadata {FORM_KEY}={meta['step'].get(FORM_KEY)!r}, expected "
            "'step'); write one with rnndeploy.export.step_graph.export_step_graph"
        )
    if meta["sequence"].get(FORM_KEY, "sequence") != "sequence":
        raise ModelError(
            f"{sequence_path} is not a sequence graph ({FORM_KEY}={meta['sequence'][FORM_KEY]!r}); "
            "give the graph rnndeploy export wrote"
        )
    for key in _SAME_MODEL_KEYS:
        if meta["sequence"].get(key) != meta["step"].get(key):
            raise ModelError(
                f"{sequence_path} and {step_path} are not the same model: their {key} differ "
                f"({meta['sequence'].get(key)!r} vs {meta['step'].get(key)!r}); export both from one checkpoint"
            )
    names = {
        form: ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
        for form, s in sessions.items()
    }
    if names["sequence"] != names["step"]:
        raise ModelError(
            f"{sequence_path} and {step_path} have different inputs/outputs: {names['sequence']} vs {names['step']}"
        )
    graph_io = {form: [*s.get_inputs(), *s.get_outputs()] for form, s in sessions.items()}
    for seq, step in zip(graph_io["sequence"], graph_io["step"], strict=True):
        # the step graph has the sequence graph's dims, with 1 for the time axis
        expected = [1 if d == TIME_AXIS else d for d in seq.shape]
        if seq.type != step.type or expected != list(step.shape):
            raise ModelError(
                f"{sequence_path} and {step_path} differ in {seq.name}: {seq.type}{list(seq.shape)} vs "
                f"{step.type}{list(step.shape)} (the step graph needs the same dtype and dims, time 1)"
            )


def _step_loop(session: ort.InferenceSession, batch: int):
    """A function timing ``n`` one-step calls with the state fed back; returns the median call in seconds."""
    inputs = session.get_inputs()
    feed = {}
    for arg in inputs:
        shape = [d if isinstance(d, int) else (1 if d == TIME_AXIS else batch) for d in arg.shape]
        dtype = np.int64 if arg.type == "tensor(int64)" else np.float32
        feed[arg.name] = np.zeros(shape, dtype)
    states = [arg.name for arg in inputs[1:]]

    def loop(n: int) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            outs = session.run(None, feed)
            times.append(time.perf_counter() - start)
            feed.update(zip(states, outs[1:], strict=True))
        return float(np.median(times))

    return loop
