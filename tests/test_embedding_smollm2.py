"""The compact embedding and head on the embedded SmolLM2-135M: the saved 3-bit base is smaller than
the 4.5-bit Q4_1 file it came from, the tied pair stays one table, and perplexity barely moves.

Slow (about two minutes on a quiet 2-core machine: a data-free 3-bit quantization, a save, two
perplexity passes over 2,048 tokens). The full measurement is ``benchmarks/bench_lm_head.py``.
"""

from __future__ import annotations

import pytest
import torch

from alphatune import BCQConfig, load_quantized, quantize_, quantize_lm_head, save_quantized
from alphatune.data import load_text_tokens
from alphatune.embedding import BCQEmbedding, BCQHead
from alphatune.evaluate import perplexity
from alphatune.files import BASE_WEIGHTS
from alphatune.models import embedded_gguf_path

pytestmark = [pytest.mark.model, pytest.mark.slow]

EVAL_TOKENS = 2048
# Measured on 8,192 tokens: 0.998x (3-bit calibrated base) and 0.999x (fp32) of the fp32 table
# (docs/lm_head.md). A 2,048-token slice is noisier; this floor still catches a broken table.
BOUND = 1.003


def test_compact_base_is_smaller_than_the_gguf_and_keeps_perplexity(
    tokenizer, shared_data_dir, tmp_path
) -> None:
    from alphatune.models import load_model

    eval_tokens = load_text_tokens(
        tokenizer, shared_data_dir / "wikitext-2" / "test.txt", max_tokens=EVAL_TOKENS
    )
    model = load_model()
    # Data-free blocks (quick); the ends are what is measured here.
    config = BCQConfig(bits=3, method="offset", iterations=0, lm_head="keep", embedding="keep")
    quantize_(model, config)
    kept = perplexity(model, eval_tokens, progress=False)

    quantize_lm_head(model, BCQConfig())  # the defaults: compact embedding and head
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, BCQEmbedding) and isinstance(head, BCQHead)
    assert head.table is embedding  # tied: one table
    compact = perplexity(model, eval_tokens, progress=False)
    assert compact < kept * BOUND

    save_quantized(model, tmp_path / "base", config)
    size = (tmp_path / "base" / BASE_WEIGHTS).stat().st_size
    assert size < embedded_gguf_path().stat().st_size  # 78 MB vs 98 MB
    loaded, _ = load_quantized(tmp_path / "base")
    ids = eval_tokens[:64][None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.get_output_embeddings().table is loaded.get_input_embeddings()
