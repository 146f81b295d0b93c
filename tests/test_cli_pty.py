"""`grok-cli chat` in a real pseudo-terminal: type lines, Ctrl-C mid-answer, /reset, Ctrl-D."""

import os
import re
import select
import sys
import time

import pytest

from conftest import ROOT
from grokcpu import demo

pty = pytest.importorskip("pty")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "grokcpu-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("GROKCPU_CACHE", str(cache))
    demo.ensure_demo()
    mp.undo()
    e = dict(os.environ, GROKCPU_CACHE=str(cache), TERM="dumb", INPUTRC=os.devnull)
    return e


class Term:
    """A child process on a pty, with expect-style reads."""

    def __init__(self, args, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                   # the child: becomes grok-cli
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "grok-cli.py", *args], env)
            finally:
                os._exit(127)
        self.buf = b""
        self.mark = 0

    def expect(self, pattern: bytes, timeout: float = 60.0) -> bytes:
        """Read until `pattern` appears after the last match; return the text up to its end."""
        deadline = time.time() + timeout
        while True:
            i = self.buf.find(pattern, self.mark)
            if i >= 0:
                seg = self.buf[self.mark:i + len(pattern)]
                self.mark = i + len(pattern)
                return seg
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got {self.buf[self.mark:][-2000:]!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"the program ended while waiting for {pattern!r}; got {self.buf[self.mark:][-2000:]!r}")
                self.buf += data

    def read_at_least(self, n: int, timeout: float = 60.0) -> None:
        """Read until n bytes have arrived after the last match."""
        deadline = time.time() + timeout
        while len(self.buf) - self.mark < n:
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for output; got {self.buf[self.mark:]!r}")
            if select.select([self.fd], [], [], 0.5)[0]:
                self.buf += os.read(self.fd, 65536)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:                                            # drain, so the child never blocks on output
                if select.select([self.fd], [], [], 0.05)[0]:
                    self.buf += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def test_chat_in_a_terminal(env):
    t = Term(["chat", "--temperature", "0", "--ignore-eos", "-n", "1800", "--threads", "1"], env)
    try:
        t.expect(b"Ctrl-D exits.")
        t.expect(b"> ")
        # a long answer, stopped with Ctrl-C once it is streaming
        t.send(b"hello\r")
        t.expect(b"hello\r\n")
        t.read_at_least(40)                                 # the answer is streaming
        t.send(b"\x03")
        seg = t.expect(b"[answer stopped; the conversation is kept]")
        assert len(seg) > 40 and b"Traceback" not in seg
        t.expect(b"> ")
        # the interrupted turn is in the history
        t.send(b"/stats\r")
        seg = t.expect(b"context tokens in the cache")
        assert re.search(rb"conversation: 1 turns, \d+ of 2048", seg), seg
        t.expect(b"> ")
        # a complete short answer
        t.send(b"/set max_tokens 3\r")
        t.expect(b"max_tokens = 3")
        t.expect(b"> ")
        t.send(b"and then?\r")
        t.expect(b"and then?\r\n")
        ans = t.expect(b"> ")
        assert ans.strip() and b"stopped" not in ans
        t.send(b"/stats\r")
        assert b"conversation: 2 turns" in t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        # /reset empties it
        t.send(b"/reset\r")
        t.expect(b"conversation cleared")
        t.expect(b"> ")
        t.send(b"/stats\r")
        assert b"conversation: 0 turns, 0 of 2048" in t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        # Ctrl-C at the prompt only gives a fresh prompt; Ctrl-D on an empty line exits 0
        t.send(b"half a line")
        time.sleep(0.3)                                     # readline (CPython) misses a SIGINT that
        t.send(b"\x03")                                     # lands while it handles a key: type first
        t.expect(b"> ")
        t.send(b"\x04")
        assert t.wait() == 0
        assert b"Traceback" not in t.buf
    finally:
        t.close()


def test_chat_line_editing_history_and_multiline(env, tmp_path):
    """readline on a terminal: the up arrow recalls the last message, the history file persists,
    a line ending in \\ continues, and Ctrl-C in a continuation drops the whole message."""
    env = dict(env, GROKCPU_CACHE=env["GROKCPU_CACHE"])
    history = os.path.join(env["GROKCPU_CACHE"], "chat_history")
    if os.path.exists(history):
        os.unlink(history)
    t = Term(["chat", "--temperature", "0", "--ignore-eos", "-n", "2", "--threads", "1"], env)
    try:
        t.expect(b"Ctrl-D exits.")
        t.expect(b"> ")
        t.send(b"/stats\r")
        t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        t.send(b"\x1b[A\r")                                 # up arrow: /stats again
        assert b"conversation: 0 turns" in t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        t.send(b"first part \\\r")
        t.expect(b"... ")
        t.send(b"second part\r")
        t.expect(b"> ")
        t.send(b"/stats\r")
        assert b"conversation: 1 turns" in t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        t.send(b"dropped \\\r")
        t.expect(b"... ")
        t.send(b"half")
        time.sleep(0.3)
        t.send(b"\x03")                                     # Ctrl-C in a continuation: nothing sent
        t.expect(b"> ")
        t.send(b"/stats\r")
        assert b"conversation: 1 turns" in t.expect(b"context tokens in the cache")
        t.expect(b"> ")
        t.send(b"\x04")
        assert t.wait() == 0
        assert b"Traceback" not in t.buf
    finally:
        t.close()
    with open(history, encoding="utf-8") as f:
        assert "/stats" in f.read()
