#!/usr/bin/env python3
"""Write a full-size Grok GGUF whose headers are real and whose weights are all ZEROS: a file
for memory plans (`grok-cli info`), not for running.

    python tools/make_gguf_skeleton.py --preset grok-1 --type q4_k --out /tmp/grok-1-Q4_K.gguf
    grok-cli info --model /tmp/grok-1-Q4_K.gguf --ram 256G

The header (metadata, tokenizer, tensor names, shapes, ggml types and offsets) is exactly what
`grok-cli convert --type TYPE` writes for that geometry (formats/convert.py: skeleton), so `info`
shows the real file's sizes and memory plan. The tensor data is never written: the file is
extended to its full size as a sparse file (a hole reads as zeros and takes no disk), so a
~170 GB Q4_K Grok-1 uses a few MB of disk. The filesystem must keep holes (ext4, xfs, btrfs,
tmpfs do); the tool refuses otherwise rather than fill the disk. Copying the file with a tool
that does not keep holes writes all of it.

The tokenizer is --tokenizer, else ../shared/data/grok1-tokenizer.model beside the repository
if it is there (else the file has none, said on stderr).
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from grokcpu.config import GrokConfig  # noqa: E402
from grokcpu.errors import GrokError  # noqa: E402
from grokcpu.formats.convert import TYPES, skeleton  # noqa: E402
from grokcpu.synth import PRESETS  # noqa: E402

SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "grok1-tokenizer.model"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write a Grok GGUF with real headers and zero (sparse) weights, "
                                             "for `grok-cli info` memory plans.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="grok-1", help="model geometry (default: grok-1)")
    ap.add_argument("--type", dest="qtype", choices=list(TYPES), default="q4_k",
                    help="tensor types, as grok-cli convert --type (default: q4_k)")
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--tokenizer", help="tokenizer.model to embed (default: ../shared/data/grok1-tokenizer.model)")
    args = ap.parse_args(argv)
    tok = args.tokenizer or (SHARED_TOKENIZER if SHARED_TOKENIZER.is_file() else None)
    try:
        files = skeleton(args.out, GrokConfig(**PRESETS[args.preset]), args.qtype, tok,
                         note=lambda s: print(s, file=sys.stderr))
    except GrokError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename})" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    for f in files:
        st = os.stat(f)
        print(f"wrote {f}: {st.st_size / 1e9:.2f} GB of zeros (sparse: {st.st_blocks * 512 / 1e6:.1f} MB on disk)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
