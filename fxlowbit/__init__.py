"""fxlowbit: a torch.compile backend that stores saved activations in low bit widths.

    import torch, fxlowbit
    model = torch.compile(model, backend="lowbit", options={"bits": 4})
    loss = model(x).sum(); loss.backward()

Importing the package registers the ``lowbit`` backend (the ``torch_dynamo_backends`` entry point
does the same without the import).
"""

from torch._dynamo import list_backends, register_backend

from . import codegen, passes  # noqa: F401
from .backend import counters, last_plans, lowbit, reset
from .config import LowbitConfig
from .explain import explain
from .integrations import install as _install_integrations
from .memory import saved_activation_bytes
from .plan import Decision, Form, Plan
from .report import Report
from .report_build import last_report

if "lowbit" not in list_backends(exclude_tags=()):
    register_backend(name="lowbit", compiler_fn=lowbit)
_install_integrations()  # accelerate / transformers.Trainer accept torch_compile_backend="lowbit"

__all__ = [
    "lowbit",
    "last_plans",
    "reset",
    "counters",
    "LowbitConfig",
    "Plan",
    "Decision",
    "Form",
    "saved_activation_bytes",
    "explain",
    "last_report",
    "Report",
]
__version__ = "0.1.0"
