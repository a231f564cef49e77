"""A decode engine for quantized Llama-family and Gemma-3 models without per-token framework
overhead.

The transformers path spends most of a decode step outside the kernels: ~210 module calls, kernel
dispatch and tensor <-> numpy conversions per token, plus the generic generate loop. The engine
converts the model once per request set and then runs every block of a token in one numba call
(``alphatune_runtime.native``) that calls the LUT kernel's njit core directly, with a static KV
cache sized to the request. Embedding and LM head run through the model's own modules
(``spec.token_io``).

Layout (the torch-free parts are ``alphatune_runtime``'s, shared with its ``Model``, which decodes
a saved base without torch):
- ``spec``: what is read from the Hugging Face model, and why a model is not served;
- ``weights``: the blocks' codes and scales handed to ``alphatune_runtime.weights`` (adapter banks
  included);
- ``model``: ``Engine``, the model's embedding and head around an ``alphatune_runtime.stack
  .BlockStack`` (the numba step, the static KV cache);
- ``alphatune_runtime.sampling``: greedy, temperature, top-k, top-p, seeded;
- ``alphatune_runtime.generate``: prefill and the decode loop, stop conditions.

Example:
    >>> engine = Engine.build(model)            # UnsupportedModelError: use model.generate
    >>> [done] = generate_ids(engine, [tokenizer.encode("Hello")], max_new_tokens=16,
    ...                       eos_ids=[tokenizer.eos_token_id])
    >>> tokenizer.decode(done.tokens)
"""

from alphatune.engine.model import Engine
from alphatune_runtime.generate import Finished, generate_ids, prompt_logits
from alphatune_runtime.sampling import Sampling, choose_tokens, filter_logits

__all__ = [
    "Engine",
    "Finished",
    "Sampling",
    "choose_tokens",
    "filter_logits",
    "generate_ids",
    "prompt_logits",
]
