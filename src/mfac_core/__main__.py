"""``python -m mfac_core``: the ``mfac-core`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
