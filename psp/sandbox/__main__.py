"""``python -m psp.sandbox``: run one sandbox PSP until interrupted."""

from psp.sandbox.server import main

if __name__ == "__main__":
    raise SystemExit(main())
