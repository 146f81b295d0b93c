import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GROKCPU_SHARED", ROOT.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures"
TOKENIZER = SHARED / "data" / "grok1-tokenizer.model"


def fixture_dirs():
    if not FIXTURES.is_dir():
        return []
    return sorted(p for p in FIXTURES.iterdir() if (p / "ckpt-0").is_dir() and (p / "config.json").is_file())


def need_shared():
    if not FIXTURES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared fixtures not found at {FIXTURES}; CI must have ../shared")
        pytest.skip(f"shared fixtures not found at {FIXTURES} (they live in ../shared beside the repo)")


class Fixture:
    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.cfg = json.loads((path / "config.json").read_text())
        self.prompt = self.cfg["inputs"]["prompt_tokens"]
        self.decode_tokens = self.cfg["inputs"]["decode_tokens"]

    def load(self, name):
        return np.load(self.path / name)


@pytest.fixture(params=[p.name for p in fixture_dirs()] or ["<no fixtures>"])
def fixture(request):
    need_shared()
    return Fixture(FIXTURES / request.param)


MEDIUM = dict(vocab_size=2048, sequence_len=512, emb_size=512, key_size=128, num_q_heads=4,
              num_kv_heads=2, num_layers=4, num_experts=8, num_selected_experts=2, ffn_size=2048)


@pytest.fixture(scope="session")
def medium_ckpt(tmp_path_factory):
    """A ~106 MB Grok-architecture checkpoint (head size 128) written by grokcpu.synth."""
    from grokcpu.synth import make_checkpoint
    out = tmp_path_factory.mktemp("medium")
    make_checkpoint(out, dict(MEDIUM), seed=7)
    return out


def greedy_direct(model, ids, n):
    """n greedy tokens computed with grokcpu's Session directly (no engine or CLI code)."""
    s = model.new_session()
    logits = s.prefill(ids, logits="last")
    out = []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        if i + 1 < n:
            logits = s.decode(out[-1])
    return out


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    """The built-in demo model, built once per test session into a private cache folder."""
    from grokcpu import demo
    mp = pytest.MonkeyPatch()
    mp.setenv("GROKCPU_CACHE", str(tmp_path_factory.getbasetemp() / "grokcpu-cache"))
    path, _ = demo.ensure_demo()
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def model(demo_path):
    import grokcpu
    return grokcpu.load(demo_path, threads=1)     # numba threads spin: one is faster on a busy 2-core box


@pytest.fixture(scope="session")
def tok(demo_path):
    from grokcpu.tokenizer import Tokenizer
    return Tokenizer(demo_path / "tokenizer.model")


def pytest_configure(config):
    """Run from a background job (`cmd &` in a script), the suite starts with SIGINT ignored, and
    every child it starts would inherit that: the Ctrl-C tests need the default handler."""
    import signal
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
