"""How a weight is fitted with BCQ: the one place that decides (blocks and the LM head both call it).

- With a Hessian (``Σ x xᵀ`` of the layer's input, from ``alphatune.calibration``): the
  ``calibrated`` method, GPTQ-style error feedback onto the offset grid (``gptq.fit_calibrated``),
  on the CPU.
- Without one: the config's data-free method (``greedy``, ``alternating`` or ``offset``), where the
  weight is. ``calibrated`` without a Hessian is an error: it needs calibration data.

Every output row is fitted independently of the others, so a weight is fitted ``FIT_ROWS`` rows at
a time: a 49k-row LM head fitted at once would need gigabytes of temporaries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alphatune import bcq
from alphatune.config import BCQConfig, QuantMethod
from alphatune.errors import ConfigError
from alphatune.gptq import fit_calibrated

# Rows fitted at once (every row's fit is independent of the others').
FIT_ROWS = 8192


def fit_weight(
    weight: Tensor,
    config: BCQConfig,
    group_size: int,
    *,
    bits: int | None = None,
    hessian: Tensor | None = None,
) -> bcq.BCQWeight:
    """Fit binary codes and scales to ``weight`` as ``config`` says.

    Args:
        weight: ``(out, in)`` float weight.
        config: method and iterations (and ``bits`` unless given).
        group_size: input features per scale group (divides ``in``).
        bits: code planes, if not ``config.bits`` (the LM head uses ``config.lm_head_bits``).
        hessian: ``(in, in)`` input statistics: fit with the ``calibrated`` method.

    Returns:
        The fitted ``BCQWeight`` (codes ``(q, out, in)``, alpha ``(q, out, G)``).
    """
    bits = config.bits if bits is None else bits
    if hessian is None and config.method == QuantMethod.CALIBRATED:
        raise ConfigError(
            "method 'calibrated' needs calibration data: use quantize_(model, config, "
            "calibration=tokens), or choose a data-free method ('greedy', 'alternating', 'offset')"
        )
    if weight.shape[0] <= FIT_ROWS:
        return _fit_rows(weight, config, group_size, bits, hessian)
    parts = [
        _fit_rows(weight[start : start + FIT_ROWS], config, group_size, bits, hessian)
        for start in range(0, weight.shape[0], FIT_ROWS)
    ]
    offsets = [p.offset for p in parts if p.offset is not None]
    return bcq.BCQWeight(
        codes=torch.cat([p.codes for p in parts], dim=1),  # (q, out, in)
        alpha=torch.cat([p.alpha for p in parts], dim=1),  # (q, out, G)
        offset=torch.cat(offsets) if offsets else None,  # (out, G)
        group_size=group_size,
    )


def _fit_rows(
    rows: Tensor, config: BCQConfig, group_size: int, bits: int, hessian: Tensor | None
) -> bcq.BCQWeight:
    if hessian is not None:
        return fit_calibrated(rows, hessian, bits, group_size, config.iterations)
    if config.method == QuantMethod.GREEDY:
        return bcq.fit_greedy(rows, bits, group_size)
    if config.method == QuantMethod.ALTERNATING:
        return bcq.fit_alternating(rows, bits, group_size, config.iterations)
    return bcq.fit_offset(rows, bits, group_size, config.iterations)


def fit_inputs(weight: Tensor, hessian: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``weight`` and ``hessian`` where and how ``fit_weight`` fits them: float32, on the CPU for
    the calibrated method (GPTQ's Cholesky factorisations), where the weight is otherwise."""
    if hessian is None:
        return weight.float(), None
    return weight.float().cpu(), hessian.float().cpu()
