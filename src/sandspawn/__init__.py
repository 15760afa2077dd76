"""sandspawn: run programs under declared restrictions, enforced by the strongest mechanisms the
host offers, with a report of exactly what was enforced.

    import sandspawn
    result = sandspawn.run(["python3", "-c", "print(1)"], "strict",
                           allow_weaker={"processes"}, capture_output=True)
    print(result.stdout)
    print(sandspawn.explain("strict", allow_weaker={"processes"}).report.format_table())

Names are imported lazily, so that the zygote (which imports sandspawn._zygote) starts small.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import create_subprocess_exec
    from .errors import PolicyError, SandspawnError, SpawnError
    from .plan import CannotEnforce, Plan, Report, ReportLine
    from .policy import Policy
    from .process import DEVNULL, PIPE, STDOUT, Popen, explain, host_probe, run

_EXPORTS = {
    "PolicyError": "errors", "SandspawnError": "errors", "SpawnError": "errors",
    "CannotEnforce": "plan", "Plan": "plan", "Report": "plan", "ReportLine": "plan",
    "Policy": "policy",
    "DEVNULL": "process", "PIPE": "process", "STDOUT": "process", "Popen": "process",
    "explain": "process", "host_probe": "process", "run": "process",
    "create_subprocess_exec": "aio",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandspawn' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
