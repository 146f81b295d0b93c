"""GPU offload (grokcpu/backends/cuda.py) without a GPU.

numba picks its CUDA simulator when NUMBA_ENABLE_CUDASIM=1 is set before numba is imported,
which this process has done long ago: the cases (tests/cuda_sim_cases.py) run in a child
pytest with the variable set. The other checks here also run in children, so that this
process never imports numba.cuda.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, fixture_dirs, need_shared


def _run(args, env=None, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _python(code, **env):
    return _run([sys.executable, "-c", code], env={**os.environ, **env})


def test_kernels_and_offloaded_forward_in_the_cuda_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    r = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda_sim_cases.py"],
             env=env, timeout=1200)
    tail = r.stdout[-8000:] + r.stderr[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and " failed" not in r.stdout, tail


# Compiles every kernel for a real GPU (sm_80) without one: catches what the simulator does not
# check (nopython typing, constant array shapes). Needs libNVVM: a CUDA toolkit, CUDA_HOME, or
# the pip wheel nvidia-cuda-nvcc-cu12.
PTX_CHECK = r"""
import sys
from numba import types as nt
from grokcpu.backends import cuda as gc
c = gc._import_cuda()
try:
    from numba.cuda.cudadrv.nvvm import NVVM
    NVVM()
except Exception as e:
    print("SKIP", " ".join(str(e).split())[:200])
    sys.exit(0)
import numba.cuda.dispatcher as dsp
class Dev:
    compute_capability = (8, 0)
dsp.get_current_device = lambda: Dev()    # device functions compile for "the current device"
f32, f64, i64 = nt.float32, nt.float64, nt.int64
A1, A2, A3 = (nt.Array(f32, n, "C") for n in (1, 2, 3))
I8, U8, L1, L2 = nt.Array(nt.int8, 2, "C"), nt.Array(nt.uint8, 1, "C"), nt.Array(i64, 1, "C"), nt.Array(i64, 2, "C")
b = gc.GPU_BLOCKS
norms = gc._norm_kernels(b.norm)
mm = b.mm_tx * b.mm_ty
kernels = [   # (kernel, signature, threads per block)
    (norms.rmsnorm, (A2, A1, f64, A2), b.norm), (norms.add_norm, (A2, A2, A1, A1, f64, A2), b.norm),
    (norms.embed_norm, (L1, A2, f32, A1, f64, A2, A2), b.norm),
    (gc._matmul_kernel(b.mm_tx, b.mm_cpt, b.mm_ty, 1), (A2, I8, A2, A2), mm),
    (gc._matmul_kernel(b.mm_tx, b.mm_cpt, b.mm_ty, b.mm_tt), (A2, I8, A2, A2), mm),
    (gc._rope_kernel(b.rope), (A2, A1, i64, i64, A2, A3, A3), b.rope),
    (gc._attention_kernel(b.attn, 128, b.attn_chunk), (A2, A3, A3, i64, U8, f32, f32, f32, A2), b.attn),
    (gc._attention_kernel(b.attn, 96, b.attn_chunk), (A2, A3, A3, i64, U8, f32, f32, f32, A2), b.attn),
    (gc._route_kernel(b.route), (A2, A2, i64, L2, A2, A2), 1024),
    (gc._unembed_kernel(b.un_lanes, b.un_rows, 1), (A2, A2, f32, A2), b.un_lanes * b.un_rows),
    (gc._unembed_kernel(b.un_lanes, b.un_rows, b.un_tt), (A2, A2, f32, A2), b.un_lanes * b.un_rows),
]
# With ptxas (CUDA toolkit), also assemble: a block must fit an SM's 64 K registers, 48 KB smem.
import os, re, shutil, subprocess, tempfile
homes = [os.environ.get("CUDA_HOME") or "/nonexistent", "/usr/local/cuda"]
ptxas = shutil.which("ptxas") or next((p for p in (os.path.join(h, "bin", "ptxas") for h in homes)
                                       if os.path.exists(p)), None)
for k, sig, threads in kernels:
    ptx, _ = c.compile_ptx(k.py_func, sig, cc=(8, 0))
    assert ".entry" in ptx
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            r = subprocess.run([ptxas, "-arch=sm_80", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        regs = int(re.findall(r"Used (\d+) registers", r.stderr)[-1])
        smem = sum(int(x) for x in re.findall(r"(\d+) bytes smem", r.stderr))
        assert regs * threads <= 65536 and smem <= 48 * 1024, (k.py_func.__name__, regs, threads, smem)
print("OK", len(kernels), "assembled" if ptxas else "")
"""


def test_kernels_compile_for_a_real_gpu():
    r = _python(PTX_CHECK, NUMBA_ENABLE_CUDASIM="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(f"no libNVVM to compile with: {r.stdout[5:].strip()}")
    assert r.stdout.startswith("OK 11")


def test_importing_grokcpu_does_not_import_numba_cuda():
    r = _python("import sys, grokcpu, grokcpu.model, grokcpu.backends.cpu, grokcpu.backends.cuda\n"
                "print('numba.cuda' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_no_gpu_is_a_clear_error():
    r = _python("from grokcpu.backends.cuda import cuda_status, CudaBackend\n"
                "from grokcpu.errors import GrokError\n"
                "ok, why = cuda_status()\n"
                "assert isinstance(why, str) and why\n"
                "if ok:\n"
                "    print('GPU', why)\n"
                "else:\n"
                "    try:\n"
                "        CudaBackend(None)\n"
                "    except GrokError as e:\n"
                "        print('ERR', e.message, '|', e.hint)\n",
                NUMBA_ENABLE_CUDASIM="0")
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("GPU"):
        pytest.skip(f"a CUDA GPU is present: {r.stdout.strip()}")
    msg, hint = r.stdout[4:].split(" | ")
    assert msg.startswith("--offload dense needs a CUDA GPU: ") and len(msg) > 40
    assert "--offload" in hint


def test_bench_gpu_runs_its_cpu_half_without_a_gpu():
    need_shared()
    path = min(fixture_dirs(), key=lambda p: p.name)
    r = _run([sys.executable, "tools/bench_gpu.py", "--model", str(path), "--prompt", "6", "--decode", "2",
              "--repeats", "1"], env={**os.environ, "NUMBA_ENABLE_CUDASIM": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "cpu" in out and "prefill" in out and "decode" in out
    if "no CUDA GPU" not in out:
        assert "offload" in out    # a GPU was there: the GPU half ran too
