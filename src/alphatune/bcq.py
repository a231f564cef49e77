"""Binary-coding quantization (BCQ): the math, as pure tensor functions.

A weight ``W`` of shape ``(out, in)`` with group size ``g`` is approximated, for every row ``r`` and
input group ``k``, as

    W[r, group k] ≈ Σ_{i=1..q} alpha[i, r, k] · codes[i, r, group k]  (+ offset[r, k])

with ``codes ∈ {-1, +1}``. Scales are returned as ``(q, out, in // g)`` and sorted so that
``alpha[0]`` is the largest: AlphaTuning trains that one (Kwon et al. 2022, section 3).

Methods:
- ``fit_greedy``: the paper's greedy BCQ (Guo et al. 2017).
- ``fit_alternating``: greedy, then alternating least squares on the scales and nearest-value
  re-coding (Xu et al. 2018); never worse than greedy (the best iterate is kept).
- ``fit_offset``: BCQ with an offset, initialised from round-to-nearest uniform quantization
  (uniform q-bit is exactly BCQ with alpha_i = s·2^(i-2), z = min + s·(2^q-1)/2) and refined by
  alternating least squares on (alpha, offset) and the codes.

Functions here do no device moves, logging or progress reporting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alphatune.errors import ConfigError
from alphatune.kernels import numba_bcq


@dataclass
class BCQWeight:
    """The result of fitting BCQ to one weight matrix.

    Attributes:
        codes: ``(q, out, in)`` int8 in {-1, +1}.
        alpha: ``(q, out, in // group_size)`` float32, non-negative, largest first.
        offset: ``(out, in // group_size)`` float32, or ``None`` for offset-free BCQ.
        group_size: input features per scale group.
    """

    codes: Tensor
    alpha: Tensor
    offset: Tensor | None
    group_size: int

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.alpha, self.offset, self.group_size)


def _check(weight: Tensor, bits: int, group_size: int | None) -> int:
    if weight.dim() != 2:
        raise ConfigError(f"BCQ expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be in 1..8, got {bits}")
    in_features = weight.shape[1]
    g = in_features if group_size is None else group_size
    if g < 1 or in_features % g:
        raise ConfigError(
            f"group_size {group_size} must divide in_features={in_features} (or be None)"
        )
    return g


def _to_rows(weight: Tensor, g: int) -> Tensor:
    """(out, in) -> (out * in/g, g): every row of the result is one scale group."""
    return weight.reshape(-1, g)


def _sign(x: Tensor) -> Tensor:
    # sign(0) would be 0; map it to +1 so that codes stay in {-1, +1}.
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _rows_greedy(rows: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Greedy BCQ on (N, g) rows: returns codes (q, N, g) as float and alpha (q, N)."""
    residual = rows.clone()
    codes, alphas = [], []
    for _ in range(bits):
        b = _sign(residual)
        a = residual.abs().mean(dim=1)
        residual -= a[:, None] * b
        codes.append(b)
        alphas.append(a)
    return torch.stack(codes), torch.stack(alphas)


def _combination_signs(bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2^q, q) table of all sign patterns; row m holds the codes of combination m."""
    m = torch.arange(2**bits, device=device)
    shifts = torch.arange(bits, device=device)
    return (((m[:, None] >> shifts) & 1) * 2 - 1).to(dtype)


def _nearest_codes(rows: Tensor, alpha: Tensor, offset: Tensor | None) -> Tensor:
    """Re-pick every element's codes as the nearest of the 2^q values Σ ±alpha_i (+ offset).

    rows (N, g), alpha (q, N), offset (N,) or None -> codes (q, N, g).
    """
    bits = alpha.shape[0]
    table = _combination_signs(bits, rows.dtype, rows.device)  # (2^q, q)
    values = alpha.T @ table.T  # (N, 2^q)
    if offset is not None:
        values = values + offset[:, None]
    values, order = values.sort(dim=1)
    midpoints = (values[:, 1:] + values[:, :-1]) / 2  # (N, 2^q - 1)
    index = torch.searchsorted(midpoints.contiguous(), rows.contiguous())  # (N, g)
    combination = order.gather(1, index)  # (N, g)
    return table[combination].permute(2, 0, 1)  # (q, N, g)


def _least_squares_scales(
    rows: Tensor, codes: Tensor, with_offset: bool, weights: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(Weighted) least-squares alpha (and offset) given the codes, one small solve per row.

    rows (N, g), codes (q, N, g), weights (N, g) or None -> alpha (q, N), offset (N,) or None.
    """
    design = codes.permute(1, 0, 2)  # (N, q, g)
    if with_offset:
        ones = torch.ones_like(design[:, :1])
        design = torch.cat([design, ones], dim=1)  # (N, q+1, g)
    weighted = design if weights is None else design * weights[:, None, :]
    gram = weighted @ design.transpose(1, 2)  # (N, p, p)
    rhs = weighted @ rows[:, :, None]  # (N, p, 1)
    # Identical or opposite code planes make the Gram matrix singular; a tiny ridge keeps the
    # solve defined and picks the minimum-norm-like solution.
    ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    gram = gram + ridge[:, None, None] * torch.eye(
        gram.shape[1], dtype=rows.dtype, device=rows.device
    )
    solution = torch.linalg.solve(gram, rhs)[..., 0]  # (N, p)
    if with_offset:
        return solution[:, :-1].T.contiguous(), solution[:, -1].contiguous()
    return solution.T.contiguous(), None


def _row_errors(
    rows: Tensor, codes: Tensor, alpha: Tensor, offset: Tensor | None, weights: Tensor | None = None
) -> Tensor:
    approx = (alpha[:, :, None] * codes).sum(0)
    if offset is not None:
        approx = approx + offset[:, None]
    squared = (rows - approx).pow(2)
    return (squared if weights is None else squared * weights).sum(dim=1)


def _alternate(
    rows: Tensor,
    codes: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    iterations: int,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Alternating refinement; keeps, per row, the best iterate so the error never rises.

    Round 0 re-fits the scales of the starting codes; every later round re-picks the codes for
    the current scales (nearest value: the same under any positive element weights), then
    re-fits the scales. ``weights`` (N, g) make the error an importance-weighted one.
    """
    if rows.device.type == "cpu" and numba_bcq.available():
        table = _combination_signs(alpha.shape[0], torch.float64, rows.device)
        return numba_bcq.alternate(rows, codes, alpha, offset, iterations, weights, table)
    return _alternate_reference(rows, codes, alpha, offset, iterations, weights)


def _alternate_reference(
    rows: Tensor,
    codes: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    iterations: int,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``_alternate`` in torch, all groups at once (any device; ``kernels.numba_bcq`` on CPU)."""
    with_offset = offset is not None
    best_err = _row_errors(rows, codes, alpha, offset, weights)
    best_codes, best_alpha, best_offset = codes, alpha, offset
    for round_ in range(iterations + 1 if iterations else 0):
        if round_:
            codes = _nearest_codes(rows, alpha, offset)
        alpha, offset = _least_squares_scales(rows, codes, with_offset, weights)
        err = _row_errors(rows, codes, alpha, offset, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better[None, :, None], codes, best_codes)
        best_alpha = torch.where(better[None, :], alpha, best_alpha)
        if offset is not None and best_offset is not None:
            best_offset = torch.where(better, offset, best_offset)
    return best_codes, best_alpha, best_offset


def _canonical(codes: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Make every alpha non-negative (flipping its codes) and sort scales largest first, per row."""
    negative = alpha < 0
    codes = torch.where(negative[:, :, None], -codes, codes)
    alpha = alpha.abs()
    alpha, order = alpha.sort(dim=0, descending=True)  # (q, N)
    codes = codes.gather(0, order[:, :, None].expand_as(codes))
    return codes, alpha


def _finish(
    codes: Tensor, alpha: Tensor, offset: Tensor | None, out: int, g: int, dtype: torch.dtype
) -> BCQWeight:
    codes, alpha = _canonical(codes, alpha)
    bits = alpha.shape[0]
    return BCQWeight(
        codes=codes.reshape(bits, out, -1).to(torch.int8),
        alpha=alpha.reshape(bits, out, -1).to(dtype),
        offset=None if offset is None else offset.reshape(out, -1).to(dtype),
        group_size=g,
    )


def fit_greedy(weight: Tensor, bits: int, group_size: int | None = None) -> BCQWeight:
    """Greedy BCQ (the paper's default): ``codes_i = sign(R)``, ``alpha_i = mean|R|``, ``R -= alpha_i·codes_i``.

    Args:
        weight: ``(out, in)`` float tensor.
        bits: q, 1..8.
        group_size: inputs per scale group (must divide ``in``); ``None`` for row-wise.
    """
    g = _check(weight, bits, group_size)
    rows = _to_rows(weight.detach().float(), g)
    codes, alpha = _rows_greedy(rows, bits)
    return _finish(codes, alpha, None, weight.shape[0], g, torch.float32)


def fit_alternating(
    weight: Tensor, bits: int, group_size: int | None = None, iterations: int = 10
) -> BCQWeight:
    """Alternating BCQ (Xu et al. 2018): greedy start, then least-squares scales and nearest codes."""
    g = _check(weight, bits, group_size)
    rows = _to_rows(weight.detach().float(), g)
    codes, alpha = _rows_greedy(rows, bits)
    codes, alpha, _ = _alternate(rows, codes, alpha, None, iterations)
    return _finish(codes, alpha, None, weight.shape[0], g, torch.float32)


def uniform_init(rows: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest uniform quantization written as BCQ with offset.

    rows (N, g) -> codes (q, N, g), alpha (q, N), offset (N,). Level ``k = Σ 2^(i-1)·c_i`` with
    ``c_i = (b_i + 1)/2`` gives ``w = min + s·k = z + Σ s·2^(i-2)·b_i``.
    """
    levels = 2**bits - 1
    low = rows.min(dim=1).values
    high = rows.max(dim=1).values
    step = ((high - low) / levels).clamp_min(1e-12)
    k = ((rows - low[:, None]) / step[:, None]).round().clamp(0, levels).long()  # (N, g)
    shifts = torch.arange(bits, device=rows.device)
    codes = (((k[None] >> shifts[:, None, None]) & 1) * 2 - 1).to(rows.dtype)  # (q, N, g)
    alpha = step[None, :] * (2.0 ** (shifts.to(rows.dtype) - 1))[:, None]  # (q, N)
    offset = low + step * levels / 2
    return codes, alpha, offset


def fit_offset(
    weight: Tensor,
    bits: int,
    group_size: int | None = None,
    iterations: int = 10,
    importance: Tensor | None = None,
) -> BCQWeight:
    """BCQ with an offset: uniform round-to-nearest start, then alternating least squares.

    Contains uniform quantization exactly, so it is never worse than round-to-nearest (in the
    error it minimises).

    Args:
        importance: optional ``(in,)`` non-negative weight per input feature (e.g. the mean
            squared activation, ``diag(H)``): the fit then minimises ``Σ importance·(w - ŵ)²``.
    """
    g = _check(weight, bits, group_size)
    rows = _to_rows(weight.detach().float(), g)
    weights = None
    if importance is not None:
        if importance.shape != (weight.shape[1],):
            raise ConfigError(
                f"importance must have shape ({weight.shape[1]},), got {tuple(importance.shape)}"
            )
        per_group = importance.float().reshape(-1, g)  # (G, g)
        per_group = per_group / per_group.mean(dim=1, keepdim=True).clamp_min(1e-12) + 1e-3
        weights = per_group.repeat(weight.shape[0], 1)  # (out * G, g), rows ordered (out, G)
    codes, alpha, offset = uniform_init(rows, bits)
    codes, alpha, offset = _alternate(rows, codes, alpha, offset, iterations, weights)
    return _finish(codes, alpha, offset, weight.shape[0], g, torch.float32)


def dequantize(codes: Tensor, alpha: Tensor, offset: Tensor | None, group_size: int) -> Tensor:
    """Rebuild the dense weight ``Σ_i alpha_i · codes_i (+ offset)``.

    Args:
        codes: ``(q, out, in)`` ±1 (any dtype).
        alpha: ``(q, out, in // group_size)``.
        offset: ``(out, in // group_size)`` or ``None``.
    Returns:
        ``(out, in)`` in alpha's dtype.
    """
    bits, out, in_features = codes.shape
    grouped = codes.reshape(bits, out, -1, group_size).to(alpha.dtype)  # (q, out, G, g)
    weight = (alpha[..., None] * grouped).sum(0)  # (out, G, g)
    if offset is not None:
        weight = weight + offset[..., None]
    return weight.reshape(out, in_features)


def reconstruction_error(weight: Tensor, approx: Tensor) -> float:
    """Relative squared error ``||W - Ŵ||² / ||W||²`` (0 is exact)."""
    w = weight.detach().double()
    return float((w - approx.detach().double()).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))


def sqnr_db(weight: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    import math

    err = reconstruction_error(weight, approx)
    return float("inf") if err == 0 else -10 * math.log10(err)
