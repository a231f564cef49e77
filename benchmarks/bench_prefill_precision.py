"""What a bf16 prefill would cost in quality: the blocks' matmuls in bf16 against float32.

Issue 15 asks for prefill at least as fast as the bf16 model, "dequantize into bf16 and use a
bf16 GEMM where it is exact enough, measured". This is the measurement, ahead of the code: a
saved 3-bit base, teacher-forced over windows of WikiText-2's test text through the model's own
forward (prompts of more than 64 tokens: each layer dequantized, then one GEMM), once in float32
and once with the blocks under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (bf16 operands,
float32 accumulation; norms, softmax and residuals stay float32). The final norm's output goes
through the head in float32 both times, so the difference is the blocks' alone; every position
counts, as every prompt position's keys and values would come from the bf16 prefill. Reported:
perplexity of each, the relative change, top-1 flips with the float32 top-2 margin at them, and
the logits' error. Timing is not measured here (a quality probe; it may run beside other work).

Usage::

    python benchmarks/bench_prefill_precision.py                # 8 windows of 512 tokens
    python benchmarks/bench_prefill_precision.py --windows 2    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_table_precision import compare, windows
from common import DECODE_Q3_BASE, CpuWatch, environment, save_watched_results

DEFAULT_OUT = Path(__file__).parent / "results" / "prefill_precision.json"
EXACT, BF16 = "float32", "bf16-blocks"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DECODE_Q3_BASE, help="a saved quantized base")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def window_logits(model: torch.nn.Module, ids: list[int], bf16_blocks: bool) -> torch.Tensor:
    """``(len(ids) - 1, V)`` float32 logits predicting each next token of ``ids``."""
    blocks = (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16_blocks else contextlib.nullcontext()
    )
    with torch.inference_mode():
        with blocks:
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.lm_head(hidden.float())[0, :-1].float()


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
        name: torch.cat([window_logits(model, ids, name == BF16) for ids in texts])
        for name in (EXACT, BF16)
    }
    targets = torch.cat([torch.tensor(ids[1:]) for ids in texts])
    nll = {name: F.cross_entropy(v, targets).item() for name, v in logits.items()}
    top2 = logits[EXACT].topk(2, dim=-1).values
    row = compare(BF16, logits[BF16], logits[EXACT], top2[:, 0] - top2[:, 1], nll, EXACT)
    row["base"] = str(args.base)
    print(row)
    save_watched_results(args.out, args, [row], env=env, watch=watch)


if __name__ == "__main__":
    main()
