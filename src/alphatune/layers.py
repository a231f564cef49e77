"""``BCQLinear``: a linear layer whose weight is stored as packed binary codes and scales.

State (all saved in the state dict):
- ``packed_codes``: ``(q, out, ceil(in/8))`` uint8 buffer, frozen forever (layout: ``packing``);
- ``alpha1``: ``(out, G)`` ``nn.Parameter``, the first (largest) scale of each row/group, which
  AlphaTuning trains;
- ``alpha_rest``: ``(q-1, out, G)`` buffer, the other scales (frozen unless made trainable);
- ``offset``: ``(out, G)`` buffer or ``None`` (BCQ with offset), frozen unless made trainable;
- ``alpha1_scale``: ``(out, 1)`` or ``(out, G)`` parameter or ``None``: a multiplier of the frozen
  α₁, initialised to 1, per output row (``AlphaTuningConfig(granularity="row")``: an adapter holds
  one value per row instead of one per (row, group)) or per (row, group)
  (``AlphaTuningConfig(multiplier=True)``: the update is relative to each α₁'s size);
- ``bias``: kept in full precision.

``alpha_grad_scale`` (a plain float, 1.0 unless ``AlphaTuningConfig(alpha_grad_scale="group_size")``
sets it) multiplies the gradients of the scales in backward (the paper's Eq. 4 divides them by the
group size).

Mixed-task batches (``alphatune.mixed``) use ``alpha1_bank``, a non-persistent ``(A, out, G)``
buffer of every loaded adapter's α₁, and ``adapter_rows``, the bank index of each batch row while
``alphatune.mixed.adapter_rows`` is active; both change only through ``set_adapter_bank`` and
``set_adapter_rows``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alphatune import bcq, kernels
from alphatune.autograd import BCQMatmul
from alphatune.config import BCQConfig
from alphatune.errors import ConfigError
from alphatune.fitting import fit_inputs, fit_weight
from alphatune.packing import pack_codes, packed_width, unpack_codes

# Names of the per-layer scale tensors (what AlphaTuning may train and adapters store).
ALPHA1_SCALE = "alpha1_scale"  # the multiplier of α₁ (AlphaTuningConfig granularity / multiplier)
SCALE_NAMES = ("alpha1", "alpha_rest", "offset", ALPHA1_SCALE)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer stored as ``(in, out)``)."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


class BCQLinear(nn.Linear):
    """Drop-in replacement for ``nn.Linear`` holding a BCQ-quantized weight.

    Build one with ``BCQLinear.from_linear(linear, config)``; ``weight`` is a read-only property
    that materialises the dense ``(out, in)`` weight (for inspection, not for speed).

    Example:
        >>> layer = BCQLinear.from_linear(nn.Linear(64, 32), BCQConfig(bits=3, group_size=32))
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        has_offset: bool,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        # nn.Linear.__init__ would allocate a dense weight; only the module machinery is wanted.
        nn.Module.__init__(self)
        if in_features % group_size:
            raise ConfigError(f"group_size {group_size} does not divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer(
            "packed_codes",
            torch.zeros(
                bits, out_features, packed_width(in_features), dtype=torch.uint8, device=device
            ),
        )
        self.alpha1 = nn.Parameter(torch.zeros(out_features, groups, device=device))
        self.register_buffer(
            "alpha_rest", torch.zeros(bits - 1, out_features, groups, device=device)
        )
        self.register_buffer(
            "offset", torch.zeros(out_features, groups, device=device) if has_offset else None
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)
        # A multiplier of α₁ (see the module docstring): created by make_trainable(alpha1_scale=...).
        self.register_parameter("alpha1_scale", None)
        self.alpha_grad_scale = 1.0  # set by alphatune.tuning; multiplies scale gradients
        # Inference-only prepared forms of the weight (eval mode only; see kernels.WeightCache):
        # rebuilt when the scales change, dropped by train() and release_weight_cache().
        self._weight_cache = kernels.WeightCache()
        # Mixed-task batches (set_adapter_bank, set_adapter_rows), never saved.
        self.register_buffer("alpha1_bank", None, persistent=False)
        self.adapter_rows: Tensor | None = None  # (B,) int64 bank index per batch row

    @classmethod
    def from_weight(
        cls,
        fitted: bcq.BCQWeight,
        bias: Tensor | None,
    ) -> BCQLinear:
        """Wrap a fitted ``BCQWeight`` (scales are rounded to fp16, the stored precision)."""
        bits, out_features, in_features = fitted.codes.shape
        device = fitted.alpha.device
        layer = cls(
            in_features,
            out_features,
            bits,
            fitted.group_size,
            fitted.offset is not None,
            bias=bias is not None,
            device=device,
        )
        alpha = _fp16_representable(fitted.alpha)
        with torch.no_grad():
            layer.packed_codes.copy_(pack_codes(fitted.codes))
            layer.alpha1.copy_(alpha[0])
            layer.alpha_rest.copy_(alpha[1:])
            if fitted.offset is not None:
                layer.offset.copy_(_fp16_representable(fitted.offset))
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        config: BCQConfig,
        *,
        bits: int | None = None,
        hessian: Tensor | None = None,
        group_size: int | None = None,
    ) -> BCQLinear:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``) as ``config`` says (``alphatune.fitting``).

        Args:
            linear: the layer to replace; the new one is on its device and in its mode.
            config: how to fit (a data-free method, or ``calibrated`` with ``hessian``).
            bits: code planes, if not ``config.bits``.
            hessian: ``(in, in)`` statistics of the layer's input, for the calibrated method.
            group_size: input features per scale group, if not ``config.group_size_for(in)``.
        """
        weight, bias = linear_weight(linear)
        if group_size is None:
            group_size = config.group_size_for(weight.shape[1])
        inputs, statistics = fit_inputs(weight, hessian)
        fitted = fit_weight(inputs, config, group_size, bits=bits, hessian=statistics)
        layer = cls.from_weight(fitted, bias).to(weight.device)
        layer.train(linear.training)
        return layer

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.dequantize()

    def effective_alpha1(self) -> Tensor:
        """α₁ as the forward uses it, ``(out, G)``: times its multiplier when there is one."""
        if self.alpha1_scale is None:
            return self.alpha1
        return self.alpha1 * self.alpha1_scale  # (out, G) * (out, 1) or (out, G)

    @property
    def alpha(self) -> Tensor:
        """All scales as the forward uses them, ``(q, out, G)``."""
        return torch.cat([self.effective_alpha1()[None], self.alpha_rest])

    def dequantize(self) -> Tensor:
        """The dense ``(out, in)`` float32 weight these codes and scales represent."""
        return kernels.dequantize_packed(
            self.packed_codes, self.alpha, self.offset, self.group_size, self.in_features
        )

    def storage_bytes(self) -> int:
        """Bytes this layer's weight takes when saved: packed codes + fp16 scales and offsets.

        The bias (kept in full precision) is not included.
        """
        scales = self.alpha1.numel() + self.alpha_rest.numel()
        scales += 0 if self.offset is None else self.offset.numel()
        return self.packed_codes.numel() + 2 * scales

    def codes(self) -> Tensor:
        """Unpacked ±1 codes ``(q, out, in)`` int8."""
        return unpack_codes(self.packed_codes, self.in_features)

    def _scales_version(self) -> tuple[object, ...] | None:
        """Identity and in-place version of every parameter and buffer of the layer.

        That covers what the weight depends on (codes, scales, offset) and the α₁ bank of
        mixed-task batches (a buffer too). ``None`` when a tensor was made under
        ``torch.inference_mode`` (no version counter): such a layer is not cached.
        """
        # Straight from the module's dicts: nn.Module.__getattr__ is slow on the decode path.
        tensors = [*self._parameters.values(), *self._buffers.values()]
        try:
            return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
        except RuntimeError:  # an inference tensor has no version counter
            return None

    def train(self, mode: bool = True) -> BCQLinear:
        """Switch mode; entering training mode drops the inference cache (scales will change)."""
        if mode:
            self.release_weight_cache()
        return super().train(mode)

    def release_weight_cache(self) -> None:
        """Free the forms of the weight kept for fast inference (rebuilt on the next eval forward)."""
        self._weight_cache.clear()

    def make_trainable(
        self, *, alpha_rest: bool = False, offset: bool = False, alpha1_scale: str | None = None
    ) -> None:
        """Turn frozen buffers into trainable parameters (same state-dict names).

        ``alpha1_scale`` (``"row"`` or ``"group"``) adds a multiplier of α₁ initialised to 1 (the
        layer computes exactly what it did before), ``(out, 1)`` or ``(out, G)``, if the layer has
        none yet.
        """
        for name, wanted in (("alpha_rest", alpha_rest), ("offset", offset)):
            value = getattr(self, name)
            if wanted and value is not None and not isinstance(value, nn.Parameter):
                del self._buffers[name]
                setattr(self, name, nn.Parameter(value))
        if alpha1_scale is not None and self.alpha1_scale is None:
            self.alpha1_scale = nn.Parameter(
                torch.ones(self.multiplier_shape(alpha1_scale), device=self.alpha1.device)
            )

    def multiplier_shape(self, granularity: str) -> tuple[int, int]:
        """Shape of an α₁ multiplier: ``(out, 1)`` per row, ``(out, G)`` per (row, group)."""
        if granularity == "row":
            return (self.out_features, 1)
        if granularity == "group":
            return tuple(self.alpha1.shape)  # type: ignore[return-value]
        raise ConfigError(f"a multiplier of α₁ is per 'row' or per 'group', got {granularity!r}")

    def set_adapter_bank(self, bank: Tensor | None) -> None:
        """Hold ``bank``, the α₁ of every adapter of a mixed batch, ``(A, out, G)``, or drop it
        (``None``). Either way the batch rows are cleared: forwards use the layer's own α₁ until
        ``set_adapter_rows``."""
        if bank is not None and bank.shape[1:] != self.alpha1.shape:
            raise ConfigError(
                f"an adapter bank of this layer is (A, {self.out_features}, "
                f"{self.alpha1.shape[1]}), got {tuple(bank.shape)}"
            )
        self.alpha1_bank = bank
        self.adapter_rows = None

    def set_adapter_rows(self, rows: Tensor | None) -> None:
        """Bank index of each batch row, ``(B,)`` int64, for the forwards that follow; ``None``:
        every row uses the layer's own α₁."""
        if rows is not None and self.alpha1_bank is None:
            raise ConfigError("this layer holds no adapter bank; load the adapters first")
        self.adapter_rows = rows

    def _scales_need_grad(self) -> bool:
        return any(
            isinstance(t, nn.Parameter) and t.requires_grad
            for t in (self.alpha1, self.alpha_rest, self.offset, self.alpha1_scale)
        )

    def forward(self, x: Tensor) -> Tensor:
        needs_graph = torch.is_grad_enabled() and (x.requires_grad or self._scales_need_grad())
        if self.adapter_rows is not None:
            if needs_graph or self.training:
                raise ConfigError(
                    "mixed-task batches (adapter rows) are for inference only: call model.eval() "
                    "and run under torch.no_grad() or torch.inference_mode(); to train, load one "
                    "adapter with load_adapter"
                )
            y = self._mixed_matmul(x)
        elif needs_graph:
            y = BCQMatmul.apply(
                x,
                self.packed_codes,
                self.effective_alpha1(),
                self.alpha_rest,
                self.offset,
                self.group_size,
                self.in_features,
                None,
                self.alpha_grad_scale,
            )
        else:
            key = None if self.training else self._scales_version()
            cache = self._weight_cache if key is not None else None
            # Cached too: on the decode path even this small concatenation shows.
            alpha = self.alpha if cache is None else cache.get("alpha", key, lambda: self.alpha)
            y = kernels.bcq_matmul(
                x,
                self.packed_codes,
                alpha,
                self.offset,
                self.group_size,
                self.in_features,
                cache=cache,
                cache_key=key or (),
            )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _mixed_matmul(self, x: Tensor) -> Tensor:
        """Each batch row with its own α₁ from the bank; the codes are shared (no bias)."""
        rows = self.adapter_rows
        assert rows is not None and self.alpha1_bank is not None  # set together by mixed.py
        if x.dim() < 2 or x.shape[0] != rows.numel():
            raise ConfigError(
                f"adapter rows name {rows.numel()} batch rows, but the input to this layer has "
                f"shape {tuple(x.shape)}; give one adapter name per batch row (with beam search: "
                "per prompt and beam)"
            )
        flat = x.reshape(-1, self.in_features)  # (T, in), rows stay contiguous
        per_row = flat.shape[0] // rows.numel()
        token_adapter = rows if per_row == 1 else rows.repeat_interleave(per_row)  # (T,)
        key = self._scales_version()  # covers the bank: it is a buffer
        y = kernels.bcq_matmul_mixed(
            flat,
            self.packed_codes,
            self.alpha1_bank,
            token_adapter,
            self.alpha_rest,
            self.offset,
            self.group_size,
            self.in_features,
            cache=self._weight_cache if key is not None else None,
            cache_key=key or (),
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, offset={self.offset is not None}, "
            f"bias={self.bias is not None}"
        )


def _fp16_representable(t: Tensor) -> Tensor:
    """Round to the nearest fp16 value (kept as float32) so saving in fp16 loses nothing."""
    return t.to(torch.float16).to(torch.float32)


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(out, in)`` weight and bias of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias
    if is_linear(module):  # Conv1D
        return module.weight.detach().T, module.bias
    raise ConfigError(f"cannot quantize {type(module).__name__}: expected nn.Linear or Conv1D")
