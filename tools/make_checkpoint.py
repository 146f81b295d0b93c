#!/usr/bin/env python3
"""Write a random-weight checkpoint in the released Grok-1 format (see grokcpu/synth.py).

    python tools/make_checkpoint.py --preset scaled-16 --out /data/scaled16
    python tools/make_checkpoint.py --preset grok-1 --layers 6 --out /data/grok-6l
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grokcpu.synth import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
