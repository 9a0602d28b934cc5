"""cntlora: training-free, data-driven initialization of LoRA adapters (CNTLoRA).

collect (hooks -> statistics) -> solve (statistics + W0 -> ΔW) -> decompose (B, A, ranks)
-> apply (a peft.PeftModel).
"""

from .apply import apply, initialize, lora_config_for
from .config import AdvancedConfig, CNTLoRAConfig, CNTLoRAError
from .export import export_plain_lora, load_adapter, save_adapter
from .plan import LayerPlan, Plan, solve, solve_parts
from .solver import Constraint, Moments, align_moments, reproduce_frozen, solve_delta, vanish
from .collect import collect_statistics, iter_statistics
from .statistics import Statistics

__version__ = "0.1.0"


def __getattr__(name: str):
    """`cntlora.zoo` (the packaged models and data sets) is imported on first use, not with cntlora."""
    if name == "zoo":
        import importlib

        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AdvancedConfig",
    "CNTLoRAConfig",
    "CNTLoRAError",
    "Constraint",
    "LayerPlan",
    "Moments",
    "Plan",
    "Statistics",
    "align_moments",
    "apply",
    "collect_statistics",
    "export_plain_lora",
    "load_adapter",
    "save_adapter",
    "initialize",
    "iter_statistics",
    "lora_config_for",
    "reproduce_frozen",
    "solve",
    "solve_delta",
    "solve_parts",
    "vanish",
]
