"""``python -m alphatune.cli``: the ``alphatune`` command, as ``torchrun`` and ``accelerate launch``
start it (``torchrun --nproc-per-node N -m alphatune.cli tune ...``)."""

import sys

from alphatune.cli import main

if __name__ == "__main__":
    sys.exit(main())
