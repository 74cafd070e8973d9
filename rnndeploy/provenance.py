"""Where measured numbers come from: the git commit of this checkout (benchmarks record it with results)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The full commit hash of the checkout holding ``path`` (default: this package's), else ``"unknown"``.

    ``RNNDEPLOY_COMMIT`` wins when set (benchmarks/gpu_session.sh sets it where the copy has no ``.git``). Git
    runs in the package's folder, so the answer does not depend on the caller's working directory.
    """
    commit = os.environ.get("RNNDEPLOY_COMMIT", "")
    if commit:
        return commit
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(path) if path is not None else Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit or "unknown"
