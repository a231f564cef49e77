"""The methods the comparison runs, each turning a spec into a model ready to train and score.

Every method ends in a ``Prepared``: the model (its trainable parameters marked ``requires_grad``),
its tokenizer, and what the method costs to store. All of them train through the one loop,
``alphatune.train.train``, and are scored by the same code (``runner``), so prompts,
tokenization, data order, budget and decoding are the same for all.

| method | what it is |
|---|---|
| ``full-ft`` | full fine-tuning of the fp32 model |
| ``lora`` | LoRA (peft) on the fp32 model, every attention and MLP projection |
| ``ft-ptq`` / ``lora-ptq`` | the ``full-ft`` / merged ``lora`` model of the same seed quantized to q bits afterwards, with our default quantizer (``quantizer=calibrated``) or round-to-nearest (``quantizer=rtn``) |
| ``ptq-lora`` | LoRA on our frozen q-bit base (dequantized weights) |
| ``qlora`` | LoRA on the fp32 model with the block linears through bitsandbytes' NF4 (blocks of 64), dequantized once: the values QLoRA computes with |
| ``peqa`` | a q-bit round-to-nearest base, one trainable multiplier per (row, group) of the whole quantized weight (PEQA's trainable scale) |
| ``prompt-tuning`` | peft prompt tuning, 20 virtual tokens initialised from text |
| ``adapter`` | bottleneck adapters (Pfeiffer: after each MLP, bottleneck 16), LoRA's learning rate |
| ``alphatuning`` | ours: options ``base`` (calibrated / greedy), ``train`` (alpha1 / all_alpha), ``offset``, ``granularity`` (group / row), ``multiplier`` (train a multiplier of α₁), ``grad_scale`` (none / group_size), ``layer_bits`` (a mixed-precision base: a ``MIXED_PRECISION`` preset, e.g. ``v-o-down4``), ``calibration`` (the base's calibration text: ``CALIBRATION_SOURCES``) |

Bases are quantized once and cached (``cache_dir()/paper/bases``), calibrated on 32 x 512
tokens of WikiText-2 *valid*, as ``alphatune quantize`` does by default.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphatune.bases import base_fingerprint
from alphatune.config import AlphaTuningConfig, BCQConfig, QuantMethod
from alphatune.data import Example
from alphatune.errors import ConfigError
from alphatune.experiments.spec import RunSpec, environment, write_json
from alphatune.layers import BCQLinear
from alphatune.models import cache_dir, load_model, load_tokenizer
from alphatune.quantize import _set_submodule, find_target_layers, quantize_, summarize
from alphatune.tuning import prepare_for_alphatuning

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CALIBRATION_SEQUENCES, CALIBRATION_LENGTH = 32, 512
# The folder of a test run's work folder that holds its trained weights for derived runs
# (LoRA → PTQ, FT → PTQ); the runner writes it whole or not at all.
HANDOFF = "model"
PROMPT_TOKENS = 20
PROMPT_INIT = "Write the data as a fluent sentence:"
FP32 = 4  # bytes


@dataclass
class Prepared:
    """A model ready to train (if the method trains) and score, and what it costs to store."""

    model: nn.Module
    tokenizer: Any
    stored_bytes: int  # the deployed model for one task: base + whatever the task adds
    adapter_bytes: int  # what one more task adds (0 when the method stores a whole model)
    bits_per_weight: float | None = None  # of the block linears, as stored
    notes: dict[str, Any] = field(default_factory=dict)
    # Run after scoring, before the result is written: saves what later runs reuse.
    handoff: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[RunSpec, Path], Prepared]
    trains: bool = True
    parent: str | None = None  # the method whose trained weights this one quantizes
    family: str = ""  # the learning-rate search whose choice this method reuses


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _model_name(spec: RunSpec) -> str:
    return spec.model


# --- bases -----------------------------------------------------------------------------------


# The grid began with the embedding and LM head kept in fp32 (the default until the compact
# 8-bit table, which costs < 0.1% perplexity: docs/lm_head.md); every run keeps them so that all
# results share one base. Stored sizes therefore count a 113 MB fp32 embedding/head.
HEAD_AND_EMBEDDING = {"lm_head": "keep", "embedding": "keep"}


# Mixed-precision bases (a run's ``layer_bits`` option names one): layers kept at more bits than
# the base's ``bits`` (``BCQConfig.layer_bits``). ``v-o-down4`` keeps the kinds llama.cpp's
# Q3_K_M keeps at more bits; of the variants benchmarks/bench_mixed_precision.py measured, it
# gained the most WebNLG perplexity per stored MiB after the 3-bit base (ratio to the unquantized
# model 1.72 -> 1.42 for +5.3 MiB of layers; a 4-bit base: 1.16 for +14.1 MiB).
MIXED_PRECISION: dict[str, dict[str, int]] = {
    "v-o-down4": {"*.v_proj": 4, "*.o_proj": 4, "*.down_proj": 4},
}


def base_config(bits: int, method: str, layer_bits: str | None = None) -> BCQConfig:
    """The q-bit base of a quantizer name: ``calibrated`` (default), ``greedy`` or ``rtn``, with
    the layers of the ``MIXED_PRECISION`` preset ``layer_bits`` at their own bits."""
    if layer_bits is not None and layer_bits not in MIXED_PRECISION:
        raise ConfigError(
            f"layer_bits must name a mixed-precision preset ({', '.join(MIXED_PRECISION)}), "
            f"got {layer_bits!r}"
        )
    settings: dict[str, Any] = {"layer_bits": MIXED_PRECISION[layer_bits] if layer_bits else {}}
    settings.update(HEAD_AND_EMBEDDING)
    if method == "rtn":  # the offset grid initialised by round-to-nearest, never refined
        return BCQConfig(bits=bits, method=QuantMethod.OFFSET, iterations=0, **settings)
    return BCQConfig(bits=bits, method=method, **settings)


# What the calibrated quantizer reads (a run's ``calibration`` option): ``wikitext`` (the
# default: 32 x 512 tokens of WikiText-2 valid) or ``wikitext+tasks``: half of it, half the
# data-to-text tasks' training pairs as the model sees them (``alphatune.data.mixed_calibration``:
# prompt, target, end of text; E2E and WebNLG alternating, seeded order), WebNLG without the
# ``webnlg-heldout`` categories so that their dev items stay unseen by every base. The 3-bit
# base leaves out more of WebNLG's input facts than the 4-bit one (docs/choosing.md), and
# WikiText-2 prose never asks the model to copy names from a prompt;
# benchmarks/bench_task_calibration.py measured the mixed text before any tuning
# (results/task_calibration.json).
CALIBRATION_SOURCES = ("wikitext", "wikitext+tasks")
TASK_PAIR_SEED = 0


def task_pairs() -> list[list[Example]]:
    """The calibration pairs of ``wikitext+tasks``: E2E's and WebNLG's training pairs, WebNLG
    without the held-out categories."""
    from alphatune.data import find_data_dir, load_e2e_train, load_triples_train
    from alphatune.experiments.tasks import HELD_OUT_CATEGORIES

    data = find_data_dir()
    e2e = load_e2e_train(data / "e2e" / "train.csv")
    webnlg = load_triples_train(
        data / "webnlg" / "train.jsonl", categories=lambda c: c not in HELD_OUT_CATEGORIES
    )
    return [e2e, webnlg]


def _check_calibration(source: str) -> None:
    if source not in CALIBRATION_SOURCES:
        raise ConfigError(f"calibration must be one of {CALIBRATION_SOURCES}, got {source!r}")


def _calibration(tokenizer: Any, source: str = "wikitext") -> Tensor:
    from alphatune.data import calibration_batch, default_file, mixed_calibration

    _check_calibration(source)
    path = default_file("calibration", "text")
    if source == "wikitext":
        return calibration_batch(tokenizer, path, CALIBRATION_SEQUENCES, CALIBRATION_LENGTH)
    return mixed_calibration(
        tokenizer,
        path,
        task_pairs(),
        CALIBRATION_SEQUENCES,
        CALIBRATION_LENGTH,
        seed=TASK_PAIR_SEED,
    )


def quantize_model(
    model: nn.Module,
    tokenizer: Any,
    bits: int,
    method: str,
    layer_bits: str | None = None,
    calibration: str = "wikitext",
) -> None:
    config = base_config(bits, method, layer_bits)
    text = _calibration(tokenizer, calibration) if config.method == QuantMethod.CALIBRATED else None
    quantize_(model, config, calibration=text)


def cached_base(
    model_name: str,
    bits: int,
    method: str,
    layer_bits: str | None = None,
    calibration: str = "wikitext",
) -> Path:
    """Directory of a saved q-bit base of ``model_name``, quantized once and reused.

    Beside it, ``<directory>.json`` records where it was quantized (``spec.environment``): a
    base quantized again on another machine differs a little (float order), and each result names
    the base it used (``_load_base``).
    """
    from alphatune.adapters import save_quantized

    config = base_config(bits, method, layer_bits)  # an unknown preset fails before any loading
    _check_calibration(calibration)
    mixed = f"-{layer_bits}" if layer_bits else ""
    text = "" if calibration == "wikitext" else f"-cal={calibration}"  # old names stay valid
    name = f"{Path(model_name).name}-{method}-q{bits}{mixed}{text}"
    directory = bases_dir() / name
    if (directory / "config.json").exists():
        return directory
    logger.info("quantizing %s to %d bits%s (%s) -> %s", model_name, bits, mixed, method, directory)
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    quantize_model(model, tokenizer, bits, method, layer_bits, calibration)
    save_quantized(model, directory, config, tokenizer)
    write_json(_made_record(directory), {"quantized": environment()})
    return directory


def bases_dir() -> Path:
    """Where ``cached_base`` keeps the grid's quantized bases."""
    return cache_dir() / "paper" / "bases"


def _made_record(directory: Path) -> Path:
    return directory.with_name(directory.name + ".json")


def made_record(directory: Path) -> dict[str, Any]:
    """What ``cached_base`` recorded beside the base: ``{"quantized": environment}``, the
    environment ``None`` for a base cached before that was recorded."""
    record = _made_record(directory)
    return json.loads(record.read_text()) if record.exists() else {"quantized": None}


def _load_base(spec: RunSpec, method: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The cached base (with the run's ``layer_bits`` preset and ``calibration`` text), its
    tokenizer and the notes that identify it in a result: its fingerprint and where it was
    quantized (unknown for a base cached before that was recorded)."""
    from alphatune.adapters import load_quantized

    if spec.bits is None:
        raise ConfigError(f"{spec.method} needs bits (a quantized base)")
    directory = cached_base(
        _model_name(spec),
        spec.bits,
        method,
        spec.option("layer_bits", None),
        spec.option("calibration", "wikitext"),
    )
    model, tokenizer = load_quantized(directory)
    made = made_record(directory)
    return model, tokenizer, {"base": {"fingerprint": base_fingerprint(model), **made}}


def _dense_copy(model: nn.Module) -> None:
    """Replace every BCQLinear by an ``nn.Linear`` holding its dequantized weight (frozen)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BCQLinear):
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(layer.dequantize())
                if layer.bias is not None:
                    dense.bias.copy_(layer.bias)
            _set_submodule(model, name, dense)


def _quantized_sizes(model: nn.Module) -> tuple[int, float]:
    summary = summarize(model)
    return summary.model_bytes, summary.bits_per_weight


# --- full precision and LoRA -------------------------------------------------------------------


def _save_weights(model: nn.Module, tokenizer: Any) -> Callable[[Path], None]:
    def handoff(work: Path) -> None:
        model.save_pretrained(work / HANDOFF)
        tokenizer.save_pretrained(work / HANDOFF)

    return handoff


def _full_ft(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer = load_model(_model_name(spec)), load_tokenizer(_model_name(spec))
    for p in model.parameters():
        p.requires_grad_(True)
    size = _unique_params(model) * FP32
    return Prepared(model, tokenizer, size, size, None, handoff=_save_weights(model, tokenizer))


def _lora_config(spec: RunSpec):
    from peft import LoraConfig

    rank = int(spec.option("rank", 8))
    return LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none"
    )


def _with_lora(
    spec: RunSpec,
    model: nn.Module,
    tokenizer: Any,
    base_bytes: int,
    bits_per_weight: float | None = None,
) -> Prepared:
    from peft import get_peft_model

    _freeze(model)
    peft_model = get_peft_model(model, _lora_config(spec))
    adapter = _trainable(peft_model) * FP32
    return Prepared(peft_model, tokenizer, base_bytes + adapter, adapter, bits_per_weight)


def _lora(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer = load_model(_model_name(spec)), load_tokenizer(_model_name(spec))
    prepared = _with_lora(spec, model, tokenizer, _unique_params(model) * FP32)

    def handoff(directory: Path) -> None:
        merged = prepared.model.merge_and_unload()  # type: ignore[operator]
        _save_weights(merged, tokenizer)(directory)

    prepared.handoff = handoff
    return prepared


def _ptq_lora(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer, notes = _load_base(spec, "calibrated")
    stored, bpw = _quantized_sizes(model)
    _dense_copy(model)
    prepared = _with_lora(spec, model, tokenizer, stored, bpw)
    prepared.notes.update(notes)
    return prepared


def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """bitsandbytes NF4 storage: 4-bit codes + one fp32 absmax per block (no double quant)."""
    return numel // 2 + -(-numel // blocksize) * FP32


def _qlora(spec: RunSpec, work: Path) -> Prepared:
    import bitsandbytes.functional as bnbf

    if spec.bits not in (None, 4):
        raise ConfigError("qlora is NF4: bits must be 4")
    model, tokenizer = load_model(_model_name(spec)), load_tokenizer(_model_name(spec))
    targets = find_target_layers(model, BCQConfig())
    other = _unique_params(model) - sum(m.weight.numel() for m in targets.values())
    stored = other * FP32
    with torch.no_grad():
        for layer in targets.values():
            packed, state = bnbf.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4")
            layer.weight.copy_(bnbf.dequantize_4bit(packed, state).to(layer.weight.dtype))
            stored += nf4_bytes(layer.weight.numel())
    bpw = (
        8
        * sum(nf4_bytes(m.weight.numel()) for m in targets.values())
        / sum(m.weight.numel() for m in targets.values())
    )
    return _with_lora(spec, model, tokenizer, stored, bpw)


# --- quantize after training ---------------------------------------------------------------------


def _after_training(parent: str) -> Callable[[RunSpec, Path], Prepared]:
    def prepare(spec: RunSpec, work: Path) -> Prepared:
        if spec.bits is None:
            raise ConfigError(f"{spec.method} needs bits")
        source = parent_work(spec, work) / HANDOFF
        if not (source / "config.json").exists():
            raise ConfigError(
                f"{spec.method}: the weights of its {parent} run are missing at {source}; run "
                f"that run (same task, seed and learning rate, split {spec.split}) first"
            )
        model, tokenizer = load_model(source), load_tokenizer(source)
        quantizer = spec.option("quantizer", "calibrated")
        quantize_model(model, tokenizer, spec.bits, quantizer, spec.option("layer_bits", None))
        _freeze(model)
        stored, bpw = _quantized_sizes(model)
        return Prepared(model, tokenizer, stored, stored, bpw)

    return prepare


def parent_spec(spec: RunSpec) -> RunSpec:
    method = METHODS[spec.method]
    assert method.parent is not None
    # How the parent's weights are quantized afterwards is not the parent's.
    options = tuple((k, v) for k, v in spec.options if k not in ("quantizer", "layer_bits"))
    return RunSpec(
        task=spec.task,
        method=method.parent,
        bits=None,
        seed=spec.seed,
        learning_rate=spec.learning_rate,
        split=spec.split,
        options=options,
        budget=spec.budget,
        model=spec.model,
    )


def parent_work(spec: RunSpec, work: Path) -> Path:
    """The work directory of the run whose weights ``spec`` quantizes (a sibling of ``work``)."""
    return work.parent / parent_spec(spec).training_id


# --- PEQA and prompt tuning --------------------------------------------------------------------


class PEQALinear(nn.Module):
    """A frozen quantized weight times one trainable scale per (row, group), as PEQA trains.

    Uniform quantization ``w = s (k - z)`` with the integer codes ``k`` and zero point ``z``
    frozen: training ``s`` multiplies the whole dequantized group, so ``w' = (s'/s) w``.
    """

    def __init__(self, layer: BCQLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size = layer.group_size
        self.register_buffer("weight", layer.dequantize().detach())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        groups = layer.in_features // layer.group_size
        self.scale = nn.Parameter(torch.ones(layer.out_features, groups))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.view(self.out_features, -1, self.group_size) * self.scale[..., None]
        return F.linear(x, weight.view(self.out_features, self.in_features), self.bias)


def _peqa(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer, notes = _load_base(spec, "rtn")
    stored, bpw = _quantized_sizes(model)
    _freeze(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BCQLinear):
            _set_submodule(model, name, PEQALinear(layer))
    adapter = _trainable(model) * FP32
    return Prepared(model, tokenizer, stored, adapter, bpw, notes=notes)


class DropVirtualTokens(nn.Module):
    """A peft prompt-tuning model whose logits cover the real tokens only (as the loss expects)."""

    def __init__(self, peft_model: nn.Module, virtual_tokens: int) -> None:
        super().__init__()
        self.peft_model, self.virtual_tokens = peft_model, virtual_tokens

    def forward(self, **inputs: Any) -> Any:
        output = self.peft_model(**inputs)
        output.logits = output.logits[:, self.virtual_tokens :]
        return output

    def generate(self, *, input_ids: Tensor, attention_mask: Tensor, **options: Any) -> Tensor:
        """Greedy or beam search with the virtual tokens in front, through the base model's own
        ``generate`` on input embeddings. peft's prompt-tuning ``generate`` (peft 0.21,
        transformers 5) fed the whole sequence again at each step while its KV cache grew: the
        answers were garbled (E2E test: 2.1 BLEU) and the decode 12x slower than LoRA's.
        Returns the prompt's ids followed by the new tokens, as ``generate`` does for ids."""
        peft = self.peft_model
        embedded = peft.get_input_embeddings()(input_ids)
        virtual = peft.get_prompt(batch_size=input_ids.shape[0]).to(embedded.dtype)
        ones = attention_mask.new_ones(input_ids.shape[0], virtual.shape[1])
        new_tokens = peft.base_model.generate(  # type: ignore[operator]
            inputs_embeds=torch.cat([virtual, embedded], dim=1),
            attention_mask=torch.cat([ones, attention_mask], dim=1),
            **options,
        )
        return torch.cat([input_ids, new_tokens], dim=1)


def _prompt_tuning(spec: RunSpec, work: Path) -> Prepared:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from alphatune.models import resolve_model_path

    model, tokenizer = load_model(_model_name(spec)), load_tokenizer(_model_name(spec))
    _freeze(model)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=PROMPT_TOKENS,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=PROMPT_INIT,
        tokenizer_name_or_path=resolve_model_path(_model_name(spec)),
    )
    peft_model = get_peft_model(model, config)
    adapter = _trainable(peft_model) * FP32
    base = _unique_params(model) * FP32
    return Prepared(
        DropVirtualTokens(peft_model, PROMPT_TOKENS), tokenizer, base + adapter, adapter
    )


class BottleneckAdapter(nn.Module):
    """Pfeiffer-style adapter: ``h + up(relu(down(h)))`` after a block's MLP, zero-initialised up.

    Written here because the maintained ``adapters`` package (1.3) pins transformers 4.x, and
    peft has no bottleneck adapter (docs/results.md says so beside the numbers).
    """

    def __init__(self, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(F.relu(self.down(hidden)))


class _WithAdapter(nn.Module):
    """A block's MLP followed by its adapter."""

    def __init__(self, mlp: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.mlp, self.adapter = mlp, adapter

    def forward(self, hidden: Tensor) -> Tensor:
        return self.adapter(self.mlp(hidden))


ADAPTER_BOTTLENECK = 16


def _bottleneck_adapter(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer = load_model(_model_name(spec)), load_tokenizer(_model_name(spec))
    _freeze(model)
    base = _unique_params(model) * FP32
    hidden = model.config.hidden_size
    blocks = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]
    if not blocks:
        raise ConfigError(f"{spec.model}: no blocks with an 'mlp' found for bottleneck adapters")
    torch.manual_seed(spec.seed)
    for block in blocks:
        adapter = BottleneckAdapter(hidden, int(spec.option("bottleneck", ADAPTER_BOTTLENECK)))
        block.mlp = _WithAdapter(block.mlp, adapter)
    adapter_bytes = _trainable(model) * FP32
    return Prepared(model, tokenizer, base + adapter_bytes, adapter_bytes)


# --- AlphaTuning -----------------------------------------------------------------------------


def _alphatuning(spec: RunSpec, work: Path) -> Prepared:
    model, tokenizer, notes = _load_base(spec, spec.option("base", "calibrated"))
    config = AlphaTuningConfig(
        train=spec.option("train", "alpha1"),
        train_offset=bool(spec.option("offset", False)),
        granularity=spec.option("granularity", "group"),
        alpha_grad_scale=spec.option("grad_scale", "none"),
        multiplier=bool(spec.option("multiplier", False)),
    )
    report = prepare_for_alphatuning(model, config)
    stored, bpw = _quantized_sizes(model)
    adapter = report.trainable * FP32
    return Prepared(
        model,
        tokenizer,
        stored + adapter,
        adapter,
        bpw,
        notes={"config": config.to_dict(), **notes},
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("full-ft", _full_ft, family="full-ft"),
        Method("lora", _lora, family="lora"),
        Method("ft-ptq", _after_training("full-ft"), False, "full-ft", "full-ft"),
        Method("lora-ptq", _after_training("lora"), False, "lora", "lora"),
        Method("ptq-lora", _ptq_lora, family="lora"),
        Method("qlora", _qlora, family="lora"),
        Method("peqa", _peqa, family="alphatuning"),
        Method("prompt-tuning", _prompt_tuning, family="prompt-tuning"),
        Method("adapter", _bottleneck_adapter, family="lora"),
        Method("alphatuning", _alphatuning, family="alphatuning"),
    )
}


def family_of(method: str, options: tuple[tuple[str, Any], ...]) -> str:
    """The learning-rate search a run takes its rate from (α₁ multipliers start at 1, so their
    steps are relative: they have a search of their own)."""
    opts = dict(options)
    if method == "alphatuning" and (opts.get("multiplier") or opts.get("granularity") == "row"):
        return "alphatuning-multiplier"
    return get_method(method).family


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return method
