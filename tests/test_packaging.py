"""The wheel: ``rnndeploy.kernels`` and ``rnndeploy.export`` inside the namespace and nothing top-level, and
``rnndeploy bench`` working from an installed (non-editable) copy outside the checkout."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a clean copy: an in-tree build/ folder could carry stale modules into the wheel.
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "__pycache__", ".venv*", "bench-results"
        ),
    )
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            wheel_dir,
            source,
        ],
        check=True,
        cwd=tmp_path,
    )
    (built,) = wheel_dir.glob("rnndeploy-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """A virtual environment with the wheel installed: its python and its site-packages."""
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The current environment's packages (and those of a base environment it chains to) stay visible (fast:
    # no torch install), but not their .pth hooks, so the editable install of this checkout cannot leak in.
    chained = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "_current_env.pth").write_text("\n".join([sysconfig.get_paths()["purelib"], *chained]) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
    )
    return python, site


def test_wheel_installs_one_namespace(wheel, installed, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"rnndeploy", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    assert "rnndeploy/bench/memory.py" in names
    assert not [n for n in names if n.startswith("rnndeploy/kernels/benchmark")], "benchmarks in the kernels"
    assert "rnndeploy/kernels/aot.py" not in names, (
        "the ahead-of-time tooling is a benchmark, not the runtime"
    )
    # pyproject lists packages by name: one left out would be missing from every installed copy
    sources = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "rnndeploy").rglob("__init__.py")}
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert sources <= shipped, f"packages missing from the wheel: {sorted(sources - shipped)}"

    python, site = installed
    probe = (
        "import importlib.util, rnndeploy, rnndeploy.kernels, rnndeploy.export\n"
        "print(rnndeploy.kernels.__file__)\n"
        "print(rnndeploy.export.__file__)\n"
        "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('export'))\n"
    )
    out = subprocess.check_output([python, "-c", probe], text=True, cwd=tmp_path).splitlines()
    assert out[0].startswith(str(site / "rnndeploy" / "kernels")), out
    assert out[1].startswith(str(site / "rnndeploy" / "export")), out
    assert out[2] == "None None", out


def test_bench_help_from_the_unpacked_wheel(wheel, tmp_path):
    """`rnndeploy bench memory --help` from the wheel's files alone, in a folder outside the checkout."""
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import rnndeploy.bench.memory as m; print(m.__file__); from rnndeploy.cli import main; main()"
    run = subprocess.run(
        [sys.executable, "-c", code, "bench", "memory", "--help"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env={**_clean_env(), "PYTHONPATH": str(unpacked)},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    where, _, help_text = run.stdout.partition("\n")
    assert where == str(unpacked / "rnndeploy" / "bench" / "memory.py")
    assert "Long time lags" in help_text and "--lengths" in help_text


def test_bench_memory_runs_from_the_installed_wheel(installed, tmp_path):
    """The installed `rnndeploy` script runs a tiny long-lag benchmark from a folder outside the checkout."""
    python, site = installed
    run = subprocess.run(
        [
            python.parent / "rnndeploy",
            "bench",
            "memory",
            "--quick",
            "--tasks",
            "copy",
            "--cells",
            "rnn",
            "--budget",
            "64",
            "--device",
            "cpu",
            "--out",
            "out",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**_clean_env(), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "copy     20 rnn" in run.stdout
    doc = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert [(r["task"], r["cell"], r["T"], r["sequences"]) for r in doc["results"]] == [
        ("copy", "rnn", 20, 64)
    ]
    assert doc["machine"]["commit"] == "unknown", "an installed copy is no checkout"
    assert (tmp_path / "out" / "memory.png").stat().st_size > 0


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point the child at the checkout."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RNNDEPLOY_COMMIT")}
