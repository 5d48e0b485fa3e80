"""`python -m pipeline ...` entry point."""

import sys

try:
    from pipeline.cli import main
except KeyboardInterrupt:  # Ctrl-C while the interpreter is still importing: no traceback, nothing begun
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
