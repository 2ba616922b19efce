"""``python -m tests.soak.run --duration SECONDS --seed N`` (``make soak DURATION=3600``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import main

if __name__ == "__main__":
    sys.exit(main())
