"""What this machine is: the CPU's model name, the key of every per-machine measurement."""

from __future__ import annotations

import subprocess
import sys


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str | None:
    """The CPU's model name: /proc/cpuinfo's ``model name`` (Linux x86), else lscpu's ``Model name``
    (Linux on ARM lists no model name in /proc/cpuinfo), else macOS's brand string; None when none
    says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    for line in _command_output(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        return _command_output(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or None
    return None
