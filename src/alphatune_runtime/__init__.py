"""alphatune's decode runtime without torch: the numba kernels and the native step, on numpy arrays.

``alphatune`` (torch, transformers) quantizes, tunes and serves models through Hugging Face; its
decode engine (``alphatune.engine``) converts a model's layers once and then runs every token
through the code here. Nothing in this package imports torch or transformers, so that a process
that only decodes need not pay for them (imports 99 MiB here, against 399 MiB for alphatune's):

- ``model``: ``Model``, a saved base (and adapter) read from its files and decoded; ``__main__``
  its command line (``python -m alphatune_runtime BASE --prompt TEXT``);
- ``files``: a base's and an adapter's names and integrity checks; ``errors``: the exceptions;
- ``lut``, ``avx2``, ``avx512``, ``table``: the kernels (LLVM vector code through numba);
- ``layout``, ``dispatch``, ``weights``: a layer's operands, the kernel chosen, their layout;
- ``native``, ``stack``, ``cache``: the numba step over a flat list of tokens, the block stack
  that calls it, the static KV cache;
- ``generate``, ``sampling``: the decode loop and the choice of tokens; ``memory``: madvise.

The package imports nothing eagerly; numba is needed to run any of it (the ``fast`` extra).
"""
