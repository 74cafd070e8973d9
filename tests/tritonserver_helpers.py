"""The real Triton Inference Server (``tritonserver`` from PyPI's nvidia-pytriton) for tests, on loopback ports,
and the offline reference its answers are checked against.

:func:`_server_files` finds the wheel's ``pytriton/tritonserver`` (skipping only where it cannot run),
:func:`start_tritonserver` runs it on a model repository with the Python backend and this Python's stub, and
ends it (and its backend stubs) by its process id. :class:`Reference` and :func:`reference_outputs` run a
model's plain exported graph offline in onnxruntime, each sequence alone with its state fed back.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rnndeploy import SequenceModel
from rnndeploy.bench.serving import free_port
from rnndeploy.export import export_onnx

STARTUP_S = 120


def _server_files() -> Path:
    """``pytriton/tritonserver`` of the installed wheel; skips only where the wheel cannot run."""
    machine = f"{platform.system()} {platform.machine()}"
    if machine != "Linux x86_64":
        pytest.skip(f"nvidia-pytriton's tritonserver is built for Linux x86_64 only; this is {machine}")
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        pytest.skip(f"nvidia-pytriton's wheel is manylinux_2_35 (glibc >= 2.35); this is {libc} {version}")
    try:
        dist = importlib.metadata.distribution("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("nvidia-pytriton is not installed: install the [dev] extra (pip install -e '.[dev]')")
    root = Path(dist.locate_file("pytriton/tritonserver"))
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "python_backend_stubs" / pyver / "triton_python_backend_stub").is_file():
        pytest.skip(f"nvidia-pytriton {dist.version} has no Python-backend stub for Python {pyver}")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip(f"the Python-backend stub links libpython{pyver}.so; this Python is built without it")
    return root


@dataclass
class Reference:
    """A model's plain exported graph (``h0``/``c0`` ``[L*D, batch, H]``), run offline by onnxruntime."""

    session: ort.InferenceSession
    state_names: list[str]
    rows: int
    hidden: int
    features: int | None  # None: token ids

    @classmethod
    def export(cls, model: SequenceModel, path: Path) -> Reference:
        export_onnx(model, path)
        c = model.config
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        features = None if c.vocab_size is not None else c.input_size
        return cls(session, list(c.state_names), c.num_layers * c.num_directions, c.hidden_size, features)

    def encode(self, tokens: tuple[int, ...]) -> np.ndarray:
        """``[1, T]`` int64 token ids, or ``[1, T, F]`` float32 features (a fixed row per token)."""
        if self.features is None:
            return np.array([tokens], np.int64)
        return FEATURES[None, list(tokens), : self.features]


FEATURES = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)


@dataclass(frozen=True)
class Request:
    seq: int  # sequence id (never 0: not a valid id for a sequence model)
    step: int
    tokens: tuple[int, ...]
    start: bool
    end: bool

    @property
    def key(self) -> str:
        return f"{self.seq}:{self.step}"


def reference_outputs(ref: Reference, requests: list[Request]) -> dict[str, np.ndarray]:
    """Each sequence alone through the plain graph, state fed back, zero state on START."""
    out, state = {}, {}
    names = ["output", *(f"{s}n" for s in ref.state_names)]
    for r in sorted(requests, key=lambda r: (r.seq, r.step)):
        if r.start:
            state[r.seq] = [np.zeros((ref.rows, 1, ref.hidden), np.float32) for _ in ref.state_names]
        feed = {"input": ref.encode(r.tokens)}
        feed.update({f"{s}0": v for s, v in zip(ref.state_names, state[r.seq])})
        y, *state[r.seq] = ref.session.run(names, feed)
        out[r.key] = y
    return out


@dataclass
class Tritonserver:
    http_url: str  # "127.0.0.1:port"
    grpc_url: str
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def start_tritonserver(
    repo: Path, tmp: Path, ready_models: list[str], explicit: bool = False
) -> Iterator[Tritonserver]:
    """``tritonserver --model-repository=repo`` (every model loaded) until ``ready_models`` are ready.

    ``explicit``: load only ``ready_models`` at start (``--model-control-mode=explicit``), so that a test can
    ask for the others through the repository API and see what happens.

    The Python backend runs the stub for this Python version from a backend folder under ``tmp``; the log is
    ``tmp/tritonserver.log``. On exit the server is terminated by its id, then its process group (the stubs).
    """
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    root = _server_files()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    backend = tmp / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(root / "backends" / "python" / name, backend / name)
    shutil.copy(root / "python_backend_stubs" / pyver / "triton_python_backend_stub", backend)
    libs = Path(importlib.metadata.distribution("nvidia-pytriton").locate_file("nvidia_pytriton.libs"))
    env = dict(os.environ)
    # The stub embeds libpython and finds its prefix by looking up `python3` on PATH: this interpreter's
    # folder first gives it this environment's site-packages (numpy, onnxruntime), a venv included.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")]
    )
    http_port, grpc_port = free_port(), free_port()
    log = tmp / "tritonserver.log"
    shm_prefix = f"rnndeploy_test_{os.getpid()}_{http_port}_"  # the stubs' shared memory, removed afterwards
    command = [
        str(root / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backend.parent}",
        *(
            ["--model-control-mode=explicit", *(f"--load-model={m}" for m in ready_models)]
            if explicit
            else []
        ),
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",
        "--exit-timeout-secs=5",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Tritonserver(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log)
    try:
        client = http.InferenceServerClient(server.http_url)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"tritonserver exited with {proc.returncode} while starting:\n{server.log_tail()}"
                )
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in ready_models):
                    break
            except (InferenceServerException, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"tritonserver not ready with {ready_models} after {STARTUP_S} s:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        client.close()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        try:  # its backend stubs, should any outlive it (they share its process group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for region in Path("/dev/shm").glob(f"{shm_prefix}*"):  # left behind by a stub that crashed
            region.unlink(missing_ok=True)
