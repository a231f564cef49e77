"""Compact input embedding and LM head: one 8-bit BCQ table serves the lookup and the tied head.

On small models the token embedding is a large share of the model: SmolLM2-135M's (tied to the
LM head) is 28.3M of its 134.5M parameters, 113 MB in fp32, more than its 3-bit blocks (46 MB).
``BCQConfig(embedding="compact", lm_head="compact")`` (the default) stores that matrix once as an
8-bit BCQ table (``BCQTable``: codes, scales and an offset per group; ~9 bits per weight with
groups of ~128), fitted data-free: round-to-nearest uniform 8-bit on each group's range, written as
BCQ with offset (``fit_table``: exactly ``bcq.fit_offset(..., iterations=0)``, computed on uint8
levels in chunks: seconds instead of a minute for SmolLM2's table). Measured in docs/lm_head.md:
within 0.1% WikiText-2 perplexity on SmolLM2; alternating refinement did not help at 8 bits.

- ``BCQEmbedding`` (at the embedding's place) looks up token ids: only the rows asked for are
  dequantized (``rows``); there is no dense copy of the table, ever.
- ``BCQHead`` (at the head's place) computes logits through the table (``linear``): up to
  ``kernels.LUT_MAX_TOKENS`` tokens with the LUT kernel on the codes, more (prefill, evaluation,
  training) in chunks of ``CHUNK_ROWS`` vocabulary rows dequantized one at a time, with an
  autograd function that gives the gradient of its input (the hidden states that α-tuning trains
  through) without keeping a dense weight. A head that was tied to the embedding uses the
  embedding's table (one copy, one set of tensors in the file); an untied head has its own.

Neither is a ``BCQLinear``: they are never α-tuned, never in an adapter, never among the block
layers (``quantize.quantized_layers``). Their tensors are buffers.

Interface for a decode engine: ``model.get_input_embeddings().rows(ids)`` (float32 rows, any id
shape) and ``model.get_output_embeddings()(hidden)`` (logits), or ``.table.linear(hidden)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from math import isfinite
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphatune import kernels
from alphatune.config import BCQConfig
from alphatune.errors import CheckpointError, ConfigError
from alphatune.kernels import lut_common, numba_table
from alphatune.memory import page_out
from alphatune.packing import packed_width

logger = logging.getLogger(__name__)

# The compact form, chosen by measurement (docs/lm_head.md): 8 bits keep SmolLM2's perplexity
# within 0.1% (6 and 7 bits, and 8 bits with one group per row, do not); groups of ~128
# (config "auto"); round to nearest (2 rounds of alternating least squares did not help).
COMPACT_BITS = 8
# Vocabulary rows dequantized at a time by the batched head (9.4 MB of fp32 at hidden 576).
CHUNK_ROWS = 4096
# Rows turned from planes into level bytes at a time when a table settles (2.4 MB of bytes at
# hidden 576): the unit in which a loaded file's planes are paged out.
_SETTLE_ROWS = 4096
# The smallest grid step of a table: twice fp16's smallest normal number (see fit_table).
MIN_STEP = 2.0**-13
# Names of a table's scale tensors (stored fp16 when lossless, like BCQLinear's).
TABLE_SCALE_NAMES = ("alpha", "offset")


@dataclass(frozen=True)
class TableSpec:
    """Shape of a ``BCQTable``: ``rows`` × ``dim`` in ``bits`` planes, scales per ``group_size``."""

    rows: int
    dim: int
    bits: int
    group_size: int

    def to_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "dim": self.dim,
            "bits": self.bits,
            "group_size": self.group_size,
        }

    @classmethod
    def from_dict(cls, data: object, where: str) -> TableSpec:
        """Read a spec written by ``to_dict``; anything else is a ``CheckpointError`` naming
        ``where`` (the file and the record)."""
        keys = ("rows", "dim", "bits", "group_size")
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise CheckpointError(f"{where}: expected a table spec with {', '.join(keys)}")
        values = {k: data[k] for k in keys}
        bad = [
            f"{k}={v!r}"
            for k, v in values.items()
            if isinstance(v, bool) or not isinstance(v, int) or v < 1
        ]
        if not bad and not 1 <= values["bits"] <= 8:
            bad.append(f"bits={values['bits']} (expected 1..8)")
        if not bad and values["dim"] % values["group_size"]:
            bad.append(f"group_size={values['group_size']} (does not divide dim={values['dim']})")
        if bad:
            raise CheckpointError(
                f"{where}: invalid table spec ({'; '.join(bad)}); the base is corrupted, create "
                "it again with 'alphatune quantize'"
            )
        return cls(**values)


def fit_levels(weight: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest uniform quantization of each group's range, as BCQ with offset.

    The grid of ``bcq.uniform_init``: level ``k`` in ``0..2^q-1`` on ``min..max``; as BCQ, plane
    ``i`` holds bit ``q-1-i`` of ``k`` with scale ``step·2^(q-2-i)``, largest first, so the planes
    of these levels are ``bcq.fit_offset(weight, bits, group_size, iterations=0)``. Computed on
    integer levels, ``CHUNK_ROWS`` rows at a time.

    Args:
        weight: ``(rows, dim)`` float, ``dim % group_size == 0``; ``bits`` <= 8.

    Returns:
        levels ``(rows, dim)`` uint8, alpha ``(q, rows, G)`` and offset ``(rows, G)`` float32,
        on the weight's device.
    """
    rows, dim = weight.shape
    groups, top = dim // group_size, 2**bits - 1
    device = weight.device
    levels = torch.empty(rows, dim, dtype=torch.uint8, device=device)
    alpha = torch.empty(bits, rows, groups, device=device)
    offset = torch.empty(rows, groups, device=device)
    for start in range(0, rows, CHUNK_ROWS):
        end = min(start + CHUNK_ROWS, rows)
        part = weight[start:end].detach().float().reshape(end - start, groups, group_size)
        low, high = part.amin(dim=-1), part.amax(dim=-1)  # (n, G)
        # At least MIN_STEP: the plane scales step·2^(bit-1) are then all normal fp16 numbers, so
        # stored in fp16 they stay an exact geometric series (numba_table.uniform_form: the
        # byte kernel). Only groups of range < 255·MIN_STEP ≈ 0.031 get a coarser grid, with
        # an error of at most MIN_STEP / 2 ≈ 6e-5.
        step = ((high - low) / top).clamp_min(MIN_STEP)
        level = ((part - low[..., None]) / step[..., None]).round_().clamp_(0, top)
        levels[start:end] = level.to(torch.uint8).reshape(end - start, dim)
        for plane in range(bits):
            alpha[plane, start:end] = step * 2.0 ** (bits - 1 - plane - 1)
        offset[start:end] = low + step * top / 2
    return levels, alpha, offset


def fit_table(weight: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``fit_levels`` with the levels as packed planes ``(q, rows, ceil(dim/8))`` uint8 (the
    stored layout), plane 0 the most significant bit."""
    levels, alpha, offset = fit_levels(weight, bits, group_size)
    return numba_table.planes_from_levels(levels, bits), alpha, offset


@dataclass(frozen=True)
class EmbeddingRecord:
    """What a saved base records of its compact embedding (``"input_embedding"``)."""

    module: str  # qualified name, e.g. "model.embed_tokens"
    table: TableSpec
    scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "table": self.table.to_dict(), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: object, where: str) -> EmbeddingRecord:
        if not isinstance(data, dict) or not isinstance(data.get("module"), str):
            raise CheckpointError(f"{where}: expected an object with 'module', 'table', 'scale'")
        scale = data.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not isfinite(scale):
            raise CheckpointError(f"{where}: 'scale' must be a number, got {scale!r}")
        table = TableSpec.from_dict(data.get("table"), f"{where}: table")
        return cls(module=data["module"], table=table, scale=float(scale))

    @classmethod
    def of(cls, name: str, module: BCQEmbedding) -> EmbeddingRecord:
        return cls(module=name, table=module.spec, scale=module.scale)


def compact_group_size(dim: int) -> int:
    """Group size of a compact table of width ``dim``: the divisor closest to 128 ("auto")."""
    return BCQConfig(group_size="auto").group_size_for(dim)


class BCQTable(nn.Module):
    """A ``(rows, dim)`` matrix stored as BCQ with offset, read by rows or multiplied.

    Saved (state dict, files): ``packed_codes`` ``(q, rows, ceil(dim/8))`` uint8 (the
    ``packing`` layout, as ``BCQLinear``), ``alpha`` ``(q, rows, G)`` float32, ``offset``
    ``(rows, G)`` float32.

    Held in one of two forms, never both (``settle`` chooses, after a fit or a load):

    - **bytes** (``levels`` ``(rows, dim)`` uint8 in place of ``packed_codes``) when the plane
      scales are geometric (``numba_table.uniform_form``; what ``fit_table`` writes): each weight
      is ``step·level + low``, read with one byte per weight by the byte kernel. Same memory as
      the planes; the state dict still gives the planes (``plane_codes``), so files, hashes and
      fingerprints are those of the planes;
    - **planes** (the stored layout) otherwise: the LUT kernel and the dequantizing paths.

    Example:
        >>> table = BCQTable.from_weight(torch.randn(100, 64))
        >>> table.rows(torch.tensor([[3, 7]])).shape
        torch.Size([1, 2, 64])
        >>> table.linear(torch.randn(5, 64)).shape
        torch.Size([5, 100])
    """

    def __init__(self, spec: TableSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        if spec.dim % spec.group_size:
            raise ConfigError(f"group_size {spec.group_size} does not divide dim={spec.dim}")
        self.spec = spec
        groups = spec.dim // spec.group_size
        self.register_buffer(
            "packed_codes",
            torch.zeros(
                spec.bits, spec.rows, packed_width(spec.dim), dtype=torch.uint8, device=device
            ),
        )
        self.register_buffer("alpha", torch.zeros(spec.bits, spec.rows, groups, device=device))
        self.register_buffer("offset", torch.zeros(spec.rows, groups, device=device))
        # Forms derived from the tensors (byte form: step and low; planes: the LUT kernel's
        # prepared codes and scales); rebuilt if a tensor changes.
        self._cache = kernels.WeightCache()

    @classmethod
    def from_weight(cls, weight: Tensor, bits: int = COMPACT_BITS) -> BCQTable:
        """Fit ``weight`` ``(rows, dim)`` with ``fit_table``; scales rounded to fp16 (as stored)."""
        rows, dim = weight.shape
        group_size = compact_group_size(dim)
        levels, alpha, offset = fit_levels(weight, bits, group_size)
        table = cls(TableSpec(rows, dim, bits, group_size), device="meta")
        table.alpha = alpha.to(torch.float16).float()
        table.offset = offset.to(torch.float16).float()
        if numba_table.uniform_form(table.alpha, table.offset) is not None:
            # The byte form straight from the fit: the planes never exist (for Gemma-3's
            # 262,144 x 640 table they would be 168 MB next to the levels).
            table._hold_codes("levels", levels)
        else:  # not expected (fit_levels keeps fp16 scales geometric): the general form
            table._hold_codes("packed_codes", numba_table.planes_from_levels(levels, bits))
        return table

    # ------------------------------------------------------------ the two forms
    @property
    def byte_form(self) -> bool:
        """Whether the table holds level bytes (``levels``) rather than packed planes."""
        return "levels" in self._buffers

    def settle(self) -> bool:
        """Hold the byte form if the table has it (see the class docstring); True if so.

        Called after a fit and after loading; a table on the meta device, or already settled,
        is left as it is.
        """
        if self.byte_form:
            return True
        codes = self.packed_codes
        if codes.is_meta or self.spec.bits > 8:
            return False
        if numba_table.uniform_form(self.alpha, self.offset) is None:
            return False
        self._hold_codes("levels", self._levels_releasing_planes(codes))
        return True

    def _levels_releasing_planes(self, codes: Tensor) -> Tensor:
        """The level bytes of ``codes``, made a chunk of rows at a time, each chunk's planes
        paged out once read where they are a view of a loaded file (``memory.page_out``): the
        planes and the bytes (27 MiB each on SmolLM2) are then never both resident, which was
        the peak of a whole load."""
        rows = codes.shape[1]
        levels = torch.empty(rows, self.spec.dim, dtype=torch.uint8, device=codes.device)
        for start in range(0, rows, _SETTLE_ROWS):
            chunk = codes[:, start : start + _SETTLE_ROWS]
            numba_table.levels_from_planes(
                chunk, self.spec.dim, out=levels[start : start + _SETTLE_ROWS]
            )
            for plane in chunk:
                page_out(plane)
        return levels

    def plane_codes(self) -> Tensor:
        """The packed planes ``(q, rows, ceil(dim/8))`` uint8 (made from the bytes in byte form)."""
        if self.byte_form:
            return numba_table.planes_from_levels(self.levels, self.spec.bits)
        return self.packed_codes

    def plane_chunks(self) -> Iterator[Tensor]:
        """The bytes of ``plane_codes()`` in order, one plane at a time in byte form (1/8 of the
        planes alive at once): hashing reads them so."""
        if not self.byte_form:
            yield self.packed_codes
            return
        for plane in range(self.spec.bits):
            yield numba_table.plane_bytes(self.levels, self.spec.bits, plane)

    def adopt(self, other: BCQTable) -> None:
        """Take ``other``'s tensors, in its form (``other`` must have the same spec)."""
        if other.spec != self.spec:
            raise ConfigError(f"cannot adopt a {other.spec} table into a {self.spec} one")
        codes = "levels" if other.byte_form else "packed_codes"
        self._hold_codes(codes, other._buffers[codes])
        self.alpha, self.offset = other.alpha, other.offset

    def _hold_codes(self, name: str, codes: Tensor | None) -> None:
        """Hold ``codes`` as ``name`` (``"levels"``: byte form, ``"packed_codes"``: planes), the
        other form's buffer dropped and the derived forms forgotten: one form at a time."""
        for form in ("packed_codes", "levels"):
            self._buffers.pop(form, None)
        self.register_buffer(name, codes)
        self._cache.clear()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # The planes, whatever the form: files and their hashes do not depend on it.
        if not self.byte_form:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        destination[prefix + "packed_codes"] = self.plane_codes()
        for name in ("alpha", "offset"):
            tensor = self._buffers[name]
            assert tensor is not None
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if self.byte_form and prefix + "packed_codes" in state_dict:
            # Back to the stored form to take the planes; settled again below.
            self._hold_codes("packed_codes", self.plane_codes())
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._cache.clear()
        self.settle()

    # ------------------------------------------------------------ reading
    def rows(self, ids: Tensor) -> Tensor:
        """The dequantized rows of ``ids`` (any shape, int64): ``(*ids.shape, dim)`` float32.

        Only those rows are dequantized. An id outside ``0..rows-1`` raises ``IndexError``.
        """
        flat = ids.reshape(-1)
        codes = self.levels if self.byte_form else self.packed_codes
        row_dim = 0 if self.byte_form else 1
        try:  # index_select checks the range (negative ids too): no separate pass over the ids
            picked = codes.index_select(row_dim, flat)
        except (RuntimeError, IndexError) as err:
            raise IndexError(
                f"token ids out of range: expected 0..{self.spec.rows - 1} ({err})"
            ) from None
        if self.byte_form:
            step, low = self._step_low()
            out = self._affine(picked, step.index_select(0, flat), low.index_select(0, flat))
        else:
            alpha = self.alpha.index_select(1, flat)  # (q, n, G)
            offset = self.offset.index_select(0, flat)  # (n, G)
            out = kernels.dequantize_packed(
                picked, alpha, offset, self.spec.group_size, self.spec.dim
            )
        return out.reshape(*ids.shape, self.spec.dim)

    @property
    def weight(self) -> Tensor:
        """The dense ``(rows, dim)`` matrix, made on each access (for code that inspects
        ``module.weight``, as ``BCQLinear.weight``); lookups and products never use it."""
        return self.dequantize()

    def dequantize(self) -> Tensor:
        """The dense ``(rows, dim)`` float32 matrix (for inspection and tests, not for speed)."""
        return self._dense(0, self.spec.rows)

    def storage_bytes(self) -> int:
        """Bytes as saved: packed codes + fp16 scales and offsets."""
        codes = self.spec.bits * self.spec.rows * packed_width(self.spec.dim)
        return codes + 2 * (self.alpha.numel() + self.offset.numel())

    # ------------------------------------------------------------ multiplying
    def linear(self, x: Tensor) -> Tensor:
        """``x`` ``(..., dim)`` times the table's transpose: ``(..., rows)`` in ``x``'s dtype.

        Gives the gradient of ``x`` when it requires one (the table itself is frozen).
        """
        if x.shape[-1] != self.spec.dim:
            raise ConfigError(f"expected inputs of width {self.spec.dim}, got {tuple(x.shape)}")
        flat = x.reshape(-1, self.spec.dim)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _TableMatmul.apply(flat.float(), self)
        elif self.byte_form and self._few_tokens_on_cpu(flat) and numba_table.available():
            y = numba_table.table_matmul(flat, self.levels, *self._step_low(), self.spec.group_size)
        elif not self.byte_form and self._lut_serves(flat):
            key = self._version()
            y = kernels.bcq_matmul(
                flat.float(),
                self.packed_codes,
                self.alpha,
                self.offset,
                self.spec.group_size,
                self.spec.dim,
                cache=self._cache if key is not None else None,
                cache_key=key or (),
            )
        else:
            y = self.chunked_linear(flat.float())
        return y.reshape(*x.shape[:-1], self.spec.rows).to(x.dtype)

    def chunked_linear(self, flat: Tensor) -> Tensor:
        """``flat`` ``(T, dim)`` float32 -> ``(T, rows)``: ``CHUNK_ROWS`` rows dequantized at a
        time and consumed by one GEMM each (never the whole dense matrix)."""
        out = flat.new_empty(flat.shape[0], self.spec.rows)
        for start in range(0, self.spec.rows, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, self.spec.rows)
            out[:, start:end] = F.linear(flat, self._dense(start, end))
        return out

    def chunked_grad(self, grad: Tensor) -> Tensor:
        """``grad`` ``(T, rows)`` times the table: ``(T, dim)`` (the gradient of ``linear``'s input)."""
        out = grad.new_zeros(grad.shape[0], self.spec.dim)
        for start in range(0, self.spec.rows, CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, self.spec.rows)
            out.addmm_(grad[:, start:end], self._dense(start, end))
        return out

    def _dense(self, start: int, end: int) -> Tensor:
        """Rows ``start:end`` dequantized, ``(end - start, dim)`` float32."""
        if self.byte_form:
            step, low = self._step_low()
            return self._affine(self.levels[start:end], step[start:end], low[start:end])
        return kernels.dequantize_packed(
            self.packed_codes[:, start:end],
            self.alpha[:, start:end],
            self.offset[start:end],
            self.spec.group_size,
            self.spec.dim,
        )

    def _affine(self, levels: Tensor, step: Tensor, low: Tensor) -> Tensor:
        """``step·level + low`` per group: ``levels`` ``(n, dim)``, ``step``/``low`` ``(n, G)``."""
        n = levels.shape[0]
        grouped = levels.float().reshape(n, -1, self.spec.group_size)
        return torch.addcmul(low[..., None], grouped, step[..., None]).reshape(n, self.spec.dim)

    def _step_low(self) -> tuple[Tensor, Tensor]:
        """``(step, low)`` of the byte form, ``(rows, G)`` float32, kept while the scales hold."""

        def build() -> tuple[Tensor, Tensor]:
            uniform = numba_table.uniform_form(self.alpha, self.offset)
            if uniform is None:
                raise ConfigError(
                    "the table's scales are no longer geometric (changed in place?); "
                    "a byte-form table needs step·2^k plane scales"
                )
            return uniform

        key = self._version()
        return build() if key is None else self._cache.get("step_low", key, build)

    def _few_tokens_on_cpu(self, flat: Tensor) -> bool:
        """Decode-sized products on the CPU, unless ``ALPHATUNE_KERNEL=reference``."""
        return (
            flat.is_cpu
            and flat.shape[0] <= kernels.LUT_MAX_TOKENS
            and not kernels.reference_forced()
        )

    def _lut_serves(self, flat: Tensor) -> bool:
        """Whether the LUT kernel runs this product (else the chunked path: no dense copy kept)."""
        return (
            self._few_tokens_on_cpu(flat)
            and lut_common.supports(self.spec.group_size, self.spec.dim)
            and kernels.lut_available()
        )

    def _version(self) -> tuple[object, ...] | None:
        codes = self.levels if self.byte_form else self.packed_codes
        tensors = (codes, self.alpha, self.offset)
        try:
            return tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # tensors made under inference_mode have no version counter
            return None

    def extra_repr(self) -> str:
        s = self.spec
        return f"rows={s.rows}, dim={s.dim}, bits={s.bits}, group_size={s.group_size}"


class _TableMatmul(torch.autograd.Function):
    """``y = x Tᵀ`` with the gradient of ``x`` only, chunk by chunk (nothing dense is kept)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, table: BCQTable) -> Tensor:  # type: ignore[override]
        ctx.table = table
        return table.chunked_linear(x.detach())

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        return ctx.table.chunked_grad(grad.float()), None


class BCQEmbedding(BCQTable):
    """A token embedding stored as a ``BCQTable``: ``forward(ids)`` dequantizes the rows of ``ids``.

    ``scale`` multiplies the rows (models such as Gemma scale their embeddings by √hidden).
    ``num_embeddings`` and ``embedding_dim`` are ``nn.Embedding``'s names for the shape.
    """

    def __init__(
        self, spec: TableSpec, scale: float = 1.0, device: torch.device | str | None = None
    ) -> None:
        super().__init__(spec, device=device)
        self.scale = float(scale)
        self.num_embeddings, self.embedding_dim = spec.rows, spec.dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> BCQEmbedding:
        """Fit a compact copy of ``embedding`` (see ``supported_embedding``)."""
        table = BCQTable.from_weight(embedding.weight)
        module = cls(table.spec, scale=embedding_scale(embedding), device="meta")
        module.adopt(table)
        return module

    def forward(self, ids: Tensor) -> Tensor:
        out = self.rows(ids)
        return out if self.scale == 1.0 else out * self.scale

    def extra_repr(self) -> str:
        scale = "" if self.scale == 1.0 else f", scale={self.scale:g}"
        return super().extra_repr() + scale


class BCQHead(nn.Module):
    """An LM head whose weight is a ``BCQTable``: ``forward(hidden)`` gives the logits.

    ``BCQHead.sharing(embedding)`` uses the table of a ``BCQEmbedding`` (the head was tied to it;
    the table is the embedding's, not registered here, so the model holds and saves it once);
    ``BCQHead.owning(table)`` holds its own (registered as ``table``). ``bias`` (if any) stays
    float32, frozen.
    """

    def __init__(self, table: BCQTable, *, shared: bool, bias: bool = False) -> None:
        super().__init__()
        if shared:
            # Not a submodule: the embedding owns the table (state dict, .to(), deepcopy memo).
            self.__dict__["_shared_table"] = table
        else:
            # The state-dict name alphatune_runtime.files.OWN_HEAD_TABLE reads.
            self.own_table = table
        self.shared = shared
        self.in_features, self.out_features = table.spec.dim, table.spec.rows
        if bias:
            self.bias = nn.Parameter(torch.zeros(table.spec.rows), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def sharing(cls, embedding: BCQEmbedding, bias: bool = False) -> BCQHead:
        return cls(embedding, shared=True, bias=bias)

    @classmethod
    def owning(cls, table: BCQTable, bias: bool = False) -> BCQHead:
        return cls(table, shared=False, bias=bias)

    @property
    def table(self) -> BCQTable:
        return self.__dict__["_shared_table"] if self.shared else self.own_table

    @property
    def weight(self) -> Tensor:
        """The dense ``(vocab, hidden)`` weight, made on each access (see ``BCQTable.weight``)."""
        return self.table.dequantize()

    def forward(self, hidden: Tensor) -> Tensor:
        y = self.table.linear(hidden)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        """Bytes this head adds to a saved base: its own table (none when shared) and bias."""
        own = 0 if self.shared else self.table.storage_bytes()
        return own + (0 if self.bias is None else 4 * self.bias.numel())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            + ("shares the embedding's table" if self.shared else "own table")
            + f", bias={self.bias is not None}"
        )


# ---------------------------------------------------------------- which modules qualify
def embedding_scale(embedding: nn.Module) -> float:
    """The factor an embedding module applies to its rows (Gemma's ``embed_scale``), else 1."""
    scale = getattr(embedding, "embed_scale", None)
    return 1.0 if scale is None else float(scale)


def supported_embedding(module: nn.Module) -> str | None:
    """``None`` if ``module`` can become a ``BCQEmbedding``, else the reason it cannot."""
    if not isinstance(module, nn.Embedding):
        return f"it is a {type(module).__name__}, not an nn.Embedding"
    if type(module) is not nn.Embedding and not hasattr(module, "embed_scale"):
        # A subclass may change forward in ways a table lookup would not reproduce.
        return f"it is a {type(module).__name__} (an nn.Embedding subclass with its own forward)"
    if module.max_norm is not None:
        return "it renormalises rows (max_norm)"
    if module.weight.is_meta:
        return "its weight is on the meta device (not loaded)"
    return None


def compact_embedding(model: nn.Module) -> tuple[str, BCQEmbedding] | None:
    """``(name, module)`` of the model's compact input embedding, if it has one."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, BCQEmbedding):
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    return None if name is None else (name, module)


def settle_tables(model: nn.Module) -> None:
    """``BCQTable.settle`` every table of ``model`` (after its tensors were loaded by name)."""
    for module in model.modules():
        if isinstance(module, BCQTable):
            module.settle()


def linear_reference(table: BCQTable, x: Tensor) -> Tensor:
    """``F.linear`` through the dense table: the definition ``BCQTable.linear`` is tested against."""
    return F.linear(x.float(), table.dequantize())
