"""The wheel installs ``rnndeploy.kernels`` and ``rnndeploy.export`` inside the namespace and nothing top-level."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_namespace(tmp_path):
    # Build from a clean copy: an in-tree build/ folder could carry stale modules into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
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
    (wheel,) = wheel_dir.glob("rnndeploy-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"rnndeploy", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The current environment's packages stay visible (fast: no torch install), but not its .pth hooks,
    # so the editable install of this checkout cannot leak in.
    (site / "_current_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
    )
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
