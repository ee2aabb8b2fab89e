"""``python -m modelscape``: the ``modelscape`` command (``modelscape.cli.main``)."""

from modelscape.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
