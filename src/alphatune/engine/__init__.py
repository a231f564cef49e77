"""A decode engine for quantized Llama-family models without per-token framework overhead.

The transformers path spends most of a decode step outside the kernels: ~210 module calls, kernel
dispatch and tensor <-> numpy conversions per token, plus the generic generate loop. The engine
converts the model once per request set and then runs every block of a token in one numba call
(``native``) that calls the LUT kernel's njit core directly, with a static KV cache sized to the
request (``cache``). Embedding and LM head run through the model's own modules (``spec.token_io``).

Layout:
- ``spec``: what is read from the Hugging Face model, and why a model is not served;
- ``weights``: the blocks' codes and scales as the kernel's operands (adapter banks included);
- ``native``: the numba step (norms, rotary, attention over the cache, projections, MLP);
- ``cache``: the static KV cache;
- ``sampling``: greedy, temperature, top-k, top-p, seeded;
- ``generate``: prefill and the decode loop, stop conditions.

Example:
    >>> engine = Engine.build(model)            # UnsupportedModelError: use model.generate
    >>> [done] = generate_ids(engine, [tokenizer.encode("Hello")], max_new_tokens=16,
    ...                       eos_ids=[tokenizer.eos_token_id])
    >>> tokenizer.decode(done.tokens)
"""

from alphatune.engine.generate import Finished, generate_ids, prompt_logits
from alphatune.engine.model import Engine
from alphatune.engine.sampling import Sampling, choose_tokens, filter_logits

__all__ = [
    "Engine",
    "Finished",
    "Sampling",
    "choose_tokens",
    "filter_logits",
    "generate_ids",
    "prompt_logits",
]
