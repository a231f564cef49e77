"""The rooms in order: one owner per policy, declared state, files defined once, a public face."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama
from torch import nn

import alphatune
from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    adapters,
    bases,
    files,
    fitting,
    gptq,
    layers,
    lm_head,
    prepare_for_alphatuning,
    quantize,
    quantize_,
)
from alphatune.bcq import fit_offset
from alphatune.layers import BCQLinear
from alphatune.state import STATE_ATTRIBUTE

SRC = Path(alphatune.__file__).parent
CONFIG = BCQConfig(bits=3, group_size=32, method="offset")


def test_package_face_exports_the_public_api() -> None:
    for name in (
        "save_quantized",
        "load_quantized",
        "save_adapter",
        "load_adapter",
        "unload_adapter",
        "load_adapters",
        "train",
        "quantize_",
        "BCQConfig",
        "AlphaTuningConfig",
        "TrainConfig",
    ):
        assert callable(getattr(alphatune, name)), name
    assert alphatune.train.__module__ == "alphatune.train"


def test_moved_names_stay_importable_from_where_they_were() -> None:
    assert adapters.save_quantized is bases.save_quantized
    assert adapters.load_quantized is bases.load_quantized
    assert adapters.base_fingerprint is bases.base_fingerprint
    assert (
        adapters.BASE_RECORD == files.BASE_RECORD
        and adapters.ADAPTER_RECORD == files.ADAPTER_RECORD
    )
    assert layers.fit_weight is fitting.fit_weight
    assert lm_head.FIT_ROWS == fitting.FIT_ROWS
    assert quantize.collect_hessians is not None


def test_format_versions_have_one_source() -> None:
    assert adapters.FORMAT_VERSION == files.ADAPTER_FORMAT_VERSION
    assert adapters.BASE_FORMAT_VERSION == files.NEWEST_BASE_FORMAT
    assert BCQConfig().format_version == files.BASE_FORMAT


@pytest.mark.parametrize("module", ["files.py", "bases.py", "adapters.py", "mixed.py", "state.py"])
def test_rooms_do_not_import_the_package_face(module: str) -> None:
    tree = ast.parse((SRC / module).read_text())
    faces = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "alphatune"
    ]
    assert faces == [], f"{module} imports from the package face at lines {faces}"


def test_state_lives_in_one_declared_attribute(tmp_path) -> None:
    """A replaced head, a loaded adapter and a bank of mixed adapters: one attribute holds all."""
    from alphatune.mixed import adapter_bank, load_adapters

    model = make_tiny_llama(128)
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset", lm_head="bf16"))
    prepare_for_alphatuning(model, AlphaTuningConfig())
    with torch.no_grad():
        for _, layer in quantize.quantized_layers(model):
            layer.alpha1.mul_(1.1)
    adapters.save_adapter(model, tmp_path / "a", AlphaTuningConfig())
    adapters.load_adapter(model, tmp_path / "a")
    bank = load_adapters(model, {"a": tmp_path / "a"})
    ours = {key for key in vars(model) if "alphatune" in key}
    assert ours == {STATE_ATTRIBUTE}
    assert adapter_bank(model) is bank and lm_head.replaced_head(model) is not None
    clone = copy.deepcopy(model)  # the state travels with the model
    assert lm_head.replaced_head(clone) == lm_head.replaced_head(model)


def test_calibrated_fit_is_gptq_on_the_offset_grid() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(200, 64)
    hessian = x.T @ x
    config = BCQConfig(bits=3, group_size=32)
    layer = BCQLinear.from_linear(linear, config, hessian=hessian)
    expected = gptq.fit_calibrated(linear.weight.detach(), hessian, 3, 32, config.iterations)
    assert torch.equal(layer.codes(), expected.codes.to(layer.codes().dtype))
    with pytest.raises(alphatune.ConfigError, match="calibrat"):
        BCQLinear.from_linear(linear, config)  # calibrated needs a Hessian


def test_rows_are_fitted_in_chunks_with_the_same_result(monkeypatch) -> None:
    weight = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    whole = fit_offset(weight, 3, 32, 10)
    monkeypatch.setattr(fitting, "FIT_ROWS", 7)
    chunked = fitting.fit_weight(weight, CONFIG, 32)
    assert torch.equal(chunked.codes, whole.codes)
    torch.testing.assert_close(chunked.alpha, whole.alpha, rtol=0, atol=0)
    torch.testing.assert_close(chunked.offset, whole.offset, rtol=0, atol=0)


def test_the_demo_runs_the_real_commands_with_their_defaults(tmp_path) -> None:
    """The demo calls ``quantize_base`` and ``tune_adapter`` with configs built from the
    library's defaults; ``alphatune quantize`` and ``alphatune tune`` start from the same ones."""
    import inspect

    from alphatune.cli import build_parser, options
    from alphatune.cli.quantize import quant_config, quantize_base
    from alphatune.cli.tune import tune_configs

    parser = build_parser()
    tune = parser.parse_args(["tune", "--base", str(tmp_path), "--output", str(tmp_path / "a")])
    assert tune_configs(tune) == (AlphaTuningConfig(), alphatune.TrainConfig())
    quant = parser.parse_args(["quantize", "--output", str(tmp_path / "b")])
    demo = parser.parse_args(["demo"])
    assert quant_config(quant) == options.bcq_config(demo) == BCQConfig()
    # What the demo does not set, quantize_base takes from the command's own defaults.
    defaults = inspect.signature(quantize_base).parameters
    for name in ("calibration", "calibration_sequences", "calibration_length"):
        assert defaults[name].default == getattr(quant, name), name


def test_the_runtime_imports_neither_torch_nor_transformers_nor_alphatune() -> None:
    """``alphatune_runtime`` decodes without torch: none of its modules imports torch,
    transformers or ``alphatune`` (whose package face imports both)."""
    import alphatune_runtime

    banned = ("torch", "transformers", "alphatune")
    found = []
    for path in sorted(Path(alphatune_runtime.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def test_importing_every_runtime_module_loads_neither_torch_nor_transformers() -> None:
    """What the AST test above cannot see (indirect imports): a fresh process imports every
    module of the runtime and lists what came with them."""
    import subprocess
    import sys

    script = (
        "import importlib, pkgutil, sys, alphatune_runtime\n"
        "for m in pkgutil.iter_modules(alphatune_runtime.__path__):\n"
        "    importlib.import_module('alphatune_runtime.' + m.name)\n"
        "print(sorted(n for n in ('torch', 'transformers', 'alphatune') if n in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
