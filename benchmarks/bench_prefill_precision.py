"""What a bf16 prefill would cost in quality: the blocks' projections in bf16 against float32.

Issue 15 asks for prefill at least as fast as the bf16 model, "dequantize into bf16 and use a
bf16 GEMM where it is exact enough, measured". This is the measurement, ahead of the code: a
saved 3-bit base, teacher-forced over windows of WikiText-2's test text through the model's own
forward (prompts of more than 64 tokens: each layer dequantized, then one GEMM), once in float32
and once per scope with those quantized projections under ``torch.autocast("cpu",
dtype=torch.bfloat16)`` (bf16 operands, float32 accumulation, as a bf16 GEMM on AMX would run;
norms, attention, softmax and residuals stay float32): every projection, the MLP's (gate, up,
down) or the attention's (q, k, v, o). The head runs in float32 every time, so the difference is
the blocks' alone; every position counts, as every prompt position's keys and values would come
from the bf16 prefill. Reported per scope: perplexity, the relative change, top-1 flips with the
float32 top-2 margin at them, and the logits' error. Timing is not measured here (a quality
probe; it may run beside other work).

The ``engine-dense-*`` scopes measure the code that runs: the engine's dense prefill
(``alphatune.engine.prefill``, every position's hidden state) with its GEMMs in bfloat16 or
float32, and its attention in float32 (the default) or bfloat16, through the same head.

Usage::

    python benchmarks/bench_prefill_precision.py                # 8 windows of 512 tokens
    python benchmarks/bench_prefill_precision.py --windows 2    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_table_precision import compare, windows
from common import DECODE_Q3_BASE, CpuWatch, environment, save_watched_results

DEFAULT_OUT = Path(__file__).parent / "results" / "prefill_precision.json"
EXACT = "float32"
# The projections each scope runs in bf16 (module names end with these).
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
SCOPES = {"bf16-all-projections": ATTENTION + MLP, "bf16-mlp": MLP, "bf16-attention": ATTENTION}
# scope -> (GEMM dtype, attention dtype)
ENGINE_SCOPES = {
    "engine-dense-bf16": (torch.bfloat16, torch.float32),
    "engine-dense-float32": (torch.float32, torch.float32),
    "engine-dense-bf16-attention-too": (torch.bfloat16, torch.bfloat16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DECODE_Q3_BASE, help="a saved quantized base")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


@contextlib.contextmanager
def bf16_projections(model: torch.nn.Module, suffixes: tuple[str, ...]) -> Iterator[None]:
    """While active, the blocks' projections named ``*suffix`` run under bf16 autocast."""
    from alphatune.layers import BCQLinear

    def enter(module: torch.nn.Module, _inputs: object) -> None:
        module._bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        module._bf16.__enter__()

    def leave(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        module._bf16.__exit__(None, None, None)
        return output.float()  # the residual stream stays float32

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, BCQLinear) and name.endswith(suffixes):
            handles += [
                module.register_forward_pre_hook(enter),
                module.register_forward_hook(leave),
            ]
    if not handles:
        raise SystemExit(f"no quantized projection ends with any of {suffixes}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def window_logits(model: torch.nn.Module, ids: list[int], scope: str) -> torch.Tensor:
    """``(len(ids) - 1, V)`` float32 logits predicting each next token of ``ids``."""
    precision = (
        contextlib.nullcontext() if scope == EXACT else bf16_projections(model, SCOPES[scope])
    )
    with torch.inference_mode():
        with precision:
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.lm_head(hidden.float())[0, :-1].float()


def engine_logits(model: torch.nn.Module, engine: Any, ids: list[int], scope: str) -> torch.Tensor:
    """``window_logits`` through the engine's dense prefill, its GEMMs in the scope's dtype."""
    import numpy as np

    from alphatune.engine.prefill import Prompt

    cache = engine.new_cache(1, len(ids))
    gemms, attention = ENGINE_SCOPES[scope]
    hidden = engine.dense.run(
        engine.embed(np.asarray(ids)), [Prompt(0, len(ids))], cache, engine.rotary(len(ids)),
        engine.threads(), gemms, every_position=True, attention_dtype=attention,
    )  # fmt: skip
    with torch.inference_mode():
        return model.lm_head(torch.from_numpy(hidden))[:-1].float()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from alphatune import load_quantized

    torch.set_num_threads(args.threads)
    model, tokenizer = load_quantized(args.base)
    model.eval()
    texts = windows(tokenizer, args.windows, args.context)
    watch = CpuWatch()
    env = environment(("torch", "transformers"))
    logits = {
        scope: torch.cat([window_logits(model, ids, scope) for ids in texts])
        for scope in (EXACT, *SCOPES)
    }
    from alphatune.engine import Engine

    engine = Engine.build(model)
    for scope in ENGINE_SCOPES:
        logits[scope] = torch.cat([engine_logits(model, engine, ids, scope) for ids in texts])
    targets = torch.cat([torch.tensor(ids[1:]) for ids in texts])
    nll = {scope: F.cross_entropy(v, targets).item() for scope, v in logits.items()}
    top2 = logits[EXACT].topk(2, dim=-1).values
    rows = []
    for scope in (*SCOPES, *ENGINE_SCOPES):
        row = compare(scope, logits[scope], logits[EXACT], top2[:, 0] - top2[:, 1], nll, EXACT)
        row["base"] = str(args.base)
        print(row)
        rows.append(row)
    save_watched_results(args.out, args, rows, env=env, watch=watch)


if __name__ == "__main__":
    main()
