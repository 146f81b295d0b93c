"""ggml's reference quantizers (quantize_row_*_ref in ggml-quants.c), built from the
llama-cpp-python sdist into a shared library, as the peer our encoders are compared with.

    python tools/ggml_reference.py [--sdist llama_cpp_python-0.3.36.tar.gz]

prints the sha256 of ggml's bytes for each type on the fixed inputs of `cases()`; the lines
are recorded in tests/test_quants.py. The library is built once into
$GROKCPU_CACHE/ggml-ref-<version>/ (needs gcc; the sdist comes from --sdist, else pip's cache or
a download).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
GGML = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/ggml/"
TYPES = {"Q4_0": (2, 32, 18), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210)}
# ggml-quants.c calls these four from the rest of ggml; the reference quantizers never reach them
STUBS = b"""#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { abort(); }
size_t ggml_row_size(int type, int64_t ne) { abort(); }
const char *ggml_type_name(int type) { abort(); }
size_t ggml_type_size(int type) { abort(); }
"""


def cache_dir() -> Path:
    from grokcpu.demo import cache_root
    return cache_root() / f"ggml-ref-{VERSION}"


def find_sdist(sdist: str | None, download: bool) -> Path | None:
    """The sdist: the path given, one already in the cache folder, else `pip download` (which
    reads pip's own cache first)."""
    if sdist:
        return Path(sdist)
    have = cache_dir() / SDIST
    if have.is_file() or not download:
        return have if have.is_file() else None
    have.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--timeout", "30", "--retries", "1", f"llama-cpp-python=={VERSION}", "-d", str(have.parent)],
                       capture_output=True, text=True)
    return have if r.returncode == 0 and have.is_file() else None


def build(sdist: str | None = None, download: bool = True) -> Path | None:
    """The path of the built library, or None when there is no sdist or no compiler."""
    lib = cache_dir() / "libggml-quants-ref.so"
    if lib.is_file():
        return lib
    src = find_sdist(sdist, download)
    if src is None:
        return None
    work = cache_dir() / f"build-{os.getpid()}"
    try:
        with tarfile.open(src) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith(GGML) and (
                m.name.endswith(".h") or m.name.endswith("/ggml-quants.c"))]
            tf.extractall(work, members=members, filter="data")
    except (OSError, tarfile.TarError):       # missing or damaged sdist
        shutil.rmtree(work, ignore_errors=True)
        return None
    g = work / GGML
    (work / "stubs.c").write_bytes(STUBS)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    # no fused multiply-adds: the plain float32 arithmetic of the C source, as our encoders do
    cmd = ["gcc", "-O2", "-ffp-contract=off", "-shared", "-fPIC", f"-I{g / 'include'}", f"-I{g / 'src'}",
           f"-I{g / 'src' / 'ggml-cpu'}", str(g / "src" / "ggml-quants.c"), str(work / "stubs.c"),
           "-o", str(tmp), "-lm"]
    try:
        ok = subprocess.run(cmd, capture_output=True).returncode == 0
    except FileNotFoundError:             # no gcc
        ok = False
    if ok:
        os.replace(tmp, lib)
    shutil.rmtree(work, ignore_errors=True)
    return lib if ok else None


def quantize(lib: ctypes.CDLL, a: np.ndarray, name: str) -> np.ndarray:
    """a [N, K] float32 as ggml type `name` by ggml's quantize_row_<type>_ref: uint8 [N, row_bytes]."""
    _, qk, bb = TYPES[name]
    a = np.ascontiguousarray(a, np.float32)
    out = np.zeros((a.shape[0], a.shape[1] // qk * bb), np.uint8)
    fn = getattr(lib, f"quantize_row_q{name[1:]}_ref")
    fn(a.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(a.size))
    return out


def cases() -> np.ndarray:
    """The fixed inputs, float32 [32, 1024]: seeded Gaussian rows from 1e-4 to 1e4, heavy tails,
    and edge cases (all-zero, constant, huge, tiny, below ggml's 1e-15 threshold, ties, spikes)."""
    rng = np.random.default_rng(20261207)
    a = rng.standard_normal((32, 1024)) * 10.0 ** rng.uniform(-4, 4, (32, 1))
    a[16:20] = rng.standard_cauchy((4, 1024))
    a[20, :256] = 0.0                                # an all-zero block, then a constant one
    a[20, 256:512] = 3.0
    a[20, 512:768] = -0.75
    a[21] *= 1e6 / np.abs(a[21]).max()               # huge (scales still finite in float16)
    a[22] *= 1e-6 / np.abs(a[22]).max()              # tiny (float16 scales underflow)
    a[23] *= 1e-17 / np.abs(a[23]).max()             # below ggml's GROUP_MAX_EPS
    a[24] = rng.integers(-8, 9, 1024)                # exact halves and ties after scaling
    a[25] = rng.integers(-8, 9, 1024) + 0.5
    a[26] = np.abs(a[26])                            # all positive: min 0
    a[27] = -np.abs(a[27])
    a[28] = 0.0
    a[28, ::37] = rng.standard_normal(28) * 50       # spikes in zeros
    a[29, 1::2] = 0.0
    return a.astype(np.float32)


def digest(b: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(b).tobytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help=f"path of {SDIST} (else pip's cache or a download)")
    args = ap.parse_args()
    path = build(args.sdist)
    if path is None:
        sys.exit(f"error: could not build ggml's reference from {SDIST} (needs gcc and the sdist: "
                 f"pass --sdist or allow `pip download`)")
    lib = ctypes.CDLL(str(path))
    a = cases()
    for name in TYPES:
        print(f"{name} {digest(quantize(lib, a, name))}")


if __name__ == "__main__":
    main()
