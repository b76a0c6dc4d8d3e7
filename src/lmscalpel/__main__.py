"""``python -m lmscalpel`` (and ``torchrun --nproc-per-node N -m lmscalpel``): the ``lmscalpel``
command."""

from lmscalpel.cli import main

if __name__ == "__main__":
    main()
