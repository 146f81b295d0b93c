#!/usr/bin/env python3
"""grok-cli without installing: `python grok-cli.py chat|generate|batch|info|bench|warmup ...`."""
from grokcpu.cli import main

if __name__ == "__main__":
    main()
