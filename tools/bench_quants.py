"""GB/s of quantized bytes read by grokcpu.quant.matvec per ggml type, beside the machine's
read ceiling (a float32 sum), for 1 and 2 threads: with float32 activations (exact) and, for the
types that have it, with x rounded to 8 bits (activations="q8"; the rounding of x included).
Prints figures; asserts nothing.

Wall-clock GB/s are the best of --reps; "cpu" is GB per CPU second (time.process_time) at one
thread, steadier than wall time on a shared machine.

    python tools/bench_quants.py [--mb 300] [--k 4096] [--rows 1] [--reps 3] [--types Q8_0,Q4_K]
                                 [--threads 1,2]
"""

import argparse
import time

import numba
import numpy as np
from numba import njit, prange

from grokcpu import quant
from grokcpu.kernels import quants as kq


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def read_sum(a, parts):
    """Sum of a float32 array in `parts` contiguous streams: the read ceiling."""
    per = (a.size + parts - 1) // parts
    tot = np.zeros(parts, np.float32)
    for p in prange(parts):
        s = np.float32(0.0)
        for i in range(p * per, min(a.size, (p + 1) * per)):
            s += a[i]
        tot[p] = s
    return tot.sum()


def best(fn, reps, clock=time.perf_counter):
    fn()
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return min(ts), float(np.median(ts))


def matrix(qtype, nbytes, K, rng):
    qk, bb, _ = kq.LAYOUT[qtype]
    rb = K // qk * bb
    w = rng.integers(0, 256, (max(1, nbytes // rb), K // qk, bb), dtype=np.uint8)
    if qtype not in (kq.F32, kq.F16, kq.BF16):
        d = np.array([0.01], np.float16).view(np.uint8)
        # every half-float field of a block at a finite value: the decode path is the same
        for o in {kq.Q6_K: (208,), kq.Q2_K: (80, 82), kq.Q3_K: (108,),
                  kq.Q4_K: (0, 2), kq.Q5_K: (0, 2)}.get(qtype, (0,)):
            w[:, :, o], w[:, :, o + 1] = d[0], d[1]
        if qtype == kq.IQ1_M:              # its d: the top nibbles of bytes 49, 51, 53, 55 (2**-7 here)
            w[:, :, [49, 51, 53]] &= 0x0F
            w[:, :, 55] = (w[:, :, 55] & 0x0F) | 0x20
    else:
        w[:] = 0
    return w.reshape(w.shape[0], rb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="matrix size in MB")
    ap.add_argument("--k", type=int, default=4096, help="input values per row")
    ap.add_argument("--rows", type=int, default=1, help="rows of x (T)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--types", default="Q8_0,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--threads", default="1,2", help="thread counts to run, comma-separated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    names = {v: k for k, v in kq.TYPE_NAMES.items()}
    a = np.ones(args.mb * 1_000_000 // 4, np.float32)
    x = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    print(f"matrix {args.mb} MB, K={args.k}, T={args.rows}; GB/s = quantized bytes / best of {args.reps}")
    mats = {}
    for name in args.types.split(","):
        qt = names[name]
        mats[name] = qt, matrix(qt, args.mb * 1_000_000, args.k, rng)
    for threads in (int(v) for v in args.threads.split(",")):
        numba.set_num_threads(threads)
        clock = time.process_time if threads == 1 else time.perf_counter
        unit = "cpu GB/s" if threads == 1 else "GB/s"
        t, _ = best(lambda: read_sum(a, threads), args.reps, clock)
        print(f"threads {threads}: read ceiling (float32 sum) {a.nbytes / t / 1e9:6.2f} {unit}")
        for name, (qt, w) in mats.items():
            out = np.empty((args.rows, w.shape[0]), np.float32)
            speed = {}
            for act in ("f32", "q8") if qt in quant.Q8_ACT else ("f32",):
                t, med = best(lambda: quant.matvec(qt, w, x, out, activations=act), args.reps, clock)
                speed[act] = w.nbytes / t / 1e9, w.nbytes / med / 1e9
            cols = "  ".join(f"{act} {b:6.2f} {unit} (median {m:.2f})" for act, (b, m) in speed.items())
            ratio = f"  q8/f32 {speed['q8'][0] / speed['f32'][0]:.2f}x" if "q8" in speed else ""
            print(f"threads {threads}: {name:6s} {cols}{ratio}")

if __name__ == "__main__":
    main()
