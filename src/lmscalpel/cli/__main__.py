"""``python -m lmscalpel.cli``: the same as the ``lmscalpel`` command."""

from lmscalpel.cli import main

main()
