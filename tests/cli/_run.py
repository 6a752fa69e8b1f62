"""Running the installed `dinv` entry point in a subprocess, as a user would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dinv(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`dinv ARGS` (the console script; `python -m dinv` if it is not on PATH), captured."""
    command = [shutil.which("dinv")] if shutil.which("dinv") else [sys.executable, "-m", "dinv"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("DINV_DEBUG", None)
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result, status: int, *fragments) -> str:
    """Asserts a failure with `status`, no traceback, and one line on stderr containing every
    fragment; returns the line."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
