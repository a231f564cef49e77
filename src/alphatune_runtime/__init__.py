"""alphatune's decode runtime without torch: the numba kernels and the native step, on numpy arrays.

``alphatune`` (torch, transformers) quantizes, tunes and serves models through Hugging Face; its
decode engine (``alphatune.engine``) converts a model's layers once and then runs every token
through the code here. Nothing in this package imports torch or transformers, so that a process
that only decodes need not pay for them (~330 MiB of imports here):

- ``lut``: the activation tables every LUT kernel builds, and the offset term;
- ``avx2`` / ``avx512``: the LUT-GEMV kernels (LLVM vector code through numba intrinsics);
- ``native``: a Llama block stack over a flat list of tokens in one numba call.

The package imports nothing eagerly; numba is needed to run any of it (the ``fast`` extra).
"""
