"""``python -m curate.app.cli``: the ``curate`` command (tests run it in a subprocess)."""

from curate.app.cli import main

main()
