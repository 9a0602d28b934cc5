"""The public surface: config tiers and their saved form, caps on the data, docstrings, module layout."""

import ast
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

import cntlora
import cntlora.collect as collect
from cntlora import AdvancedConfig, CNTLoRAConfig, CNTLoRAError

from helpers import TwoLayerMLP, feature_batches

SRC = Path(cntlora.__file__).parent


def test_advanced_options_live_in_their_sub_config():
    top = {f for f in CNTLoRAConfig.__dataclass_fields__}
    assert {"mode", "r", "alpha", "use_rslora", "base", "strength", "gamma", "pretrain_source", "ridge", "vas",
            "budget", "r_min", "r_max", "seed", "constraints", "advanced"} == top
    assert CNTLoRAConfig().advanced == AdvancedConfig()
    with pytest.raises(TypeError):
        CNTLoRAConfig(a_row_norm=1.0)  # research options are not top-level arguments


def test_from_dict_reads_the_flat_and_the_nested_form():
    flat = {"mode": "cross", "r": 4, "a_row_norm": 1.0, "truncation": "objective", "shift_floor": "max"}
    cfg = CNTLoRAConfig.from_dict(flat)
    assert (cfg.mode, cfg.r, cfg.advanced.a_row_norm, cfg.advanced.truncation, cfg.advanced.shift_floor) == \
        ("cross", 4, 1.0, "objective", "max")
    assert CNTLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CNTLoRAError, match="unknown CNTLoRAConfig field"):
        CNTLoRAConfig.from_dict({"rank": 4})


@pytest.mark.parametrize("kwargs", [dict(alpha=float("nan")), dict(alpha=float("inf")), dict(ridge=float("nan")),
                                    dict(gamma=float("inf")), dict(strength=float("nan")), dict(r=2.5),
                                    dict(budget=float("inf")), dict(advanced=dict(a_row_norm=float("inf"))),
                                    dict(advanced=dict(svd_niter=-1))])
def test_values_that_are_not_finite_or_whole_are_refused(kwargs):
    with pytest.raises(CNTLoRAError):
        CNTLoRAConfig(**kwargs)


def test_an_adapter_saved_with_the_flat_config_still_loads(tmp_path):
    torch.manual_seed(0)
    model = TwoLayerMLP()
    cfg = CNTLoRAConfig(r=2, base="residual", advanced=AdvancedConfig(a_row_norm=1.0))
    peft_model = cntlora.initialize(model, feature_batches(), cfg, target_modules=["fc1", "fc2"], progress=False)
    cntlora.save_adapter(peft_model, tmp_path / "a")
    meta_path = tmp_path / "a" / "cntlora.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].update(meta["config"].pop("advanced"))  # the form adapters were saved in before the sub-config
    for key in ("checksum", "checksums", "base_digest"):  # nor had they these
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    x = feature_batches()[0]
    with torch.no_grad():
        want = peft_model(x)
    torch.manual_seed(0)
    loaded = cntlora.load_adapter(TwoLayerMLP(), tmp_path / "a")
    assert loaded.cntlora_plan.config.advanced.a_row_norm == 1.0
    with torch.no_grad():
        assert torch.allclose(loaded(x), want, atol=1e-6)


@pytest.mark.parametrize("caps, match", [(dict(max_batches=0), "max_batches=0"), (dict(max_batches=-1), "max_batches"),
                                         (dict(max_tokens=0), "max_tokens"), (dict(max_stats_memory=0), "max_stats")])
def test_caps_that_would_drop_data_are_refused(caps, match):
    with pytest.raises(CNTLoRAError, match=match):
        cntlora.collect_statistics(TwoLayerMLP(), feature_batches(), ["fc1"], progress=False, **caps)


def test_an_endless_stream_stops_at_the_cap_and_says_so(monkeypatch):
    monkeypatch.setattr(collect, "STREAM_CAP", 5)
    batch = feature_batches()[0]

    def endless():
        while True:
            yield batch

    with pytest.warns(UserWarning, match="max_batches"):
        stats = cntlora.collect_statistics(TwoLayerMLP(), endless(), ["fc1"], progress=False)
    assert stats.info["fine"]["batches"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit cap reads exactly that much, silently
        stats = cntlora.collect_statistics(TwoLayerMLP(), endless(), ["fc1"], max_batches=3, progress=False)
    assert stats.info["fine"]["batches"] == 3


PUBLIC = ["collect_statistics", "iter_statistics", "initialize", "solve", "solve_parts", "apply", "save_adapter",
          "load_adapter", "export_plain_lora"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_functions_document_args_returns_raises(name):
    doc = inspect.getdoc(getattr(cntlora, name)) or ""
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, f"cntlora.{name}'s docstring lacks {section}"


def _imports(path: Path) -> set:
    """The cntlora modules a module imports at import time (module level only; lazy imports don't count)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            base = (node.module or "").split(".")[0]
            found |= {base} if base else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cntlora."):
            found.add(node.module.split(".")[1])
    return found


def test_the_package_has_no_import_cycle_and_no_module_over_400_lines():
    modules = {p.stem: p for p in SRC.glob("*.py") if p.stem != "__init__"}
    for sub in (p for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        modules[sub.name] = sub / "__init__.py"
    graph = {m: _imports(p) & set(modules) for m, p in modules.items()}

    def visit(m, stack):
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        for dep in graph[m]:
            visit(dep, stack + [m])

    for m in graph:
        visit(m, [])
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
