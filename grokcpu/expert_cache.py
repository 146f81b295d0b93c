"""The expert cache: only routed experts enter RAM, into a fixed pool under a byte budget.

Dense weights stay memory-mapped. An expert (its slices of moe/linear, linear_v and linear_1;
a GGUF's of ffn_{gate,up,down}_exps, or its own ffn_*.E tensors) is three byte ranges, a GGUF's
in several segments where a .partNofM cut falls inside one. A miss splits them into READ_CHUNK
pieces that a pool of reader threads reads at once (a deep queue: one outstanding read at a
time gets a fraction of what the drive gives). When the budget is below the experts, the reads
bypass the page cache (`O_DIRECT`, block-aligned into each reader's scratch, then copied into the
slot): no second copy in RAM, and a fraction of the CPU time of buffered reads (0.03 against
0.3-0.5 CPU-seconds per GB here, which on few cores is what bounded the miss rate). Where direct
reads are not supported, or the budget holds every expert (the page cache then serves the next
run), reads are buffered; below the experts their file pages are then dropped
(`POSIX_FADV_DONTNEED`, one load later), so the budget means what it says. `prefetch` starts loads
early, `request` starts a layer's misses together, `acquire` waits only for what is not there yet.

ckpt-0's down projection is stored transposed, output-major [D, F] (the file holds [F, D]): each
piece is transposed into the slot by the thread that read it (compiled, without the GIL), so
the transposes run on every core in parallel with the other pieces' reads; decode then reads it
with contiguous dot products (`qmatvec_t`), 1.5-1.7x as fast as the input-major kernel. Pieces
reach the slot with whole-line streaming stores (kernels/stream.py): a miss costs about 0.35
CPU-seconds per GB here, the direct read's pinning and the copy out of scratch included. A GGUF
slot holds the three parts' file bytes as they are (down too; their ggml types may differ, and
a slot is the largest expert's size): `acquire` returns GMatrix views of it, which the same
kernels read as the mapped matrices.

A slot in use by the layer being computed is pinned (reference counted) and never evicted;
which unpinned slot goes is the policy's choice (LRU by default).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import GrokError
from .kernels.stream import copy_into, transpose_into

GB = 1e9


# -- eviction policies ---------------------------------------------------------------------------

class LRU:
    """Least recently used: evict the expert whose last use is oldest."""
    name = "lru"

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, evictable):
        for key in self.order:            # oldest first
            if key in evictable:
                return key
        return next(iter(evictable))


class LFU(LRU):
    """Least frequently used (counts since load of the model), least recent among equals."""
    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count: dict = {}

    def touch(self, key):
        super().touch(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, evictable):
        rank = {k: i for i, k in enumerate(self.order)}
        return min(evictable, key=lambda k: (self.count.get(k, 0), rank.get(k, -1)))


POLICIES = {"lru": LRU, "lfu": LFU}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise GrokError(f"unknown expert cache policy {name!r}",
                        hint=f"choose one of: {', '.join(POLICIES)}") from None


# -- the cache -----------------------------------------------------------------------------------

class _Slot:
    __slots__ = ("key", "refs", "ready", "error", "prefetched", "used", "last_step")

    def __init__(self):
        self.key = None
        self.refs = 0
        self.ready = threading.Event()
        self.error = None
        self.prefetched = False      # loaded on a guess, not on demand
        self.used = False            # acquired since it was loaded
        self.last_step = -1          # forward step of its last use


class ExpertCache:
    """A pool of `slots` expert-sized buffers; `acquire(layer, expert)` returns its three matrices."""

    GUESS_WARMUP = 32          # guesses judged before prefetch may pause itself
    READ_AHEAD_SLACK = 8 << 20  # bytes past a read that the kernel may have read ahead
    READ_CHUNK = 4 << 20        # bytes per read of a miss, the blocks around it included
    IO_THREADS = 32             # reads in flight at once (the drive's queue depth, not cores):
                                # 128 MiB filled the disk here; each reader has a READ_CHUNK scratch
    ALIGN = 4096                # direct reads: offsets, lengths and buffers in these units
    HUGE = 2 << 20              # a huge page

    def __init__(self, ckpt, budget_bytes: int, policy: str = "lru", prefetch: bool = False,
                 io_threads: int = IO_THREADS, drop_page_cache: bool = True, reads: str = "auto"):
        c = ckpt.config
        self.ckpt = ckpt
        self.L, self.E, self.k = c.num_layers, c.num_experts, c.num_selected_experts
        D, F = c.emb_size, c.ffn_size
        # a ckpt-0 slot: gate (linear) [D, F], up (linear_v) [D, F], down (linear_1) transposed
        # to [D, F], output-major; kernels.decode.experts_whole reads slots the same way. A GGUF
        # slot: gate, up and down as the file holds them (GMatrix views; no transpose).
        self.gguf = getattr(ckpt, "format", "ckpt-0") == "gguf"
        self.slot_shape = (3, D, F)
        # bytes per read: with the blocks around it for a direct read, READ_CHUNK at most
        self.piece = max(self.ALIGN, self.READ_CHUNK - 2 * self.ALIGN)
        # rows of [F, D] per read of the down range: a multiple of 64 (whole transpose blocks)
        self.down_rows = max(64, self.piece // D // 64 * 64)
        self._scratch = threading.local()
        self.expert_bytes = ckpt.expert_bytes          # a slot: the largest expert
        total = self.L * self.E
        need = self.k * self.expert_bytes
        if budget_bytes < need:
            raise GrokError(
                f"expert cache budget {budget_bytes / GB:.3f} GB cannot hold the {self.k} experts one "
                f"token needs ({need / GB:.3f} GB)", hint=f"use --expert-cache-gb {need / GB:.3f} or more")
        self.nslots = int(min(total, budget_bytes // self.expert_bytes))
        self.budget_bytes = self.nslots * self.expert_bytes
        self.policy = make_policy(policy)
        self.prefetch_enabled = prefetch
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        # reads: "direct", "buffered", or "auto" (direct when the page cache is to hold nothing)
        self.direct = hasattr(os, "O_DIRECT") and (reads == "direct" or (reads == "auto" and drop_page_cache))
        # np.empty does not touch the pages: RAM is committed as slots fill. numpy asks for huge
        # pages: a first touch costs more (faults may wait on compaction), decode reads faster
        # (a Q4_K decode 1.2x here). Aligned, so a slot's lines are whole for streaming stores.
        self.pool = _aligned_empty(self.nslots * self.expert_bytes, self.ALIGN).view(
            np.uint8 if self.gguf else np.int8).reshape(self.nslots, self.expert_bytes)
        self.pool_view = self.pool.view()             # what kernels read: the mapped weights' type
        self.pool_view.flags.writeable = False
        self.slots = [_Slot() for _ in range(self.nslots)]
        # slot_of[layer, expert]: its slot once loaded, -1 otherwise, for kernels that find
        # resident experts themselves (kernels.decode.moe_resident). Set by the reader when a
        # load is done, cleared when the slot is claimed for another expert: claims happen in
        # the model's thread, so nothing a kernel sees as resident goes away during its call.
        self.slot_of = np.full((self.L, self.E), -1, np.int64)
        self._used: list = []            # note_used's uses not yet counted
        self._slot_views: list = [None] * self.nslots     # a slot's matrices (fixed views of the pool)
        self.where: dict = {}            # (layer, expert) -> slot index
        self.pinned: set = set()
        self._pending_drop: list = []
        self.step = 0
        self.lock = threading.Lock()
        self.io = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="grokcpu-io")
        self._fds: dict = {}             # (path, direct) -> fd
        self._buffered: set = set()      # files whose direct reads were refused
        self.ranges = {}                  # (layer, expert) -> gate, up, down: [(path, offset, nbytes)] each
        for layer in range(self.L):
            for e in range(self.E):
                self.ranges[(layer, e)] = ckpt.expert_segments(layer, e)
        self.stats = _Stats(self.L)

    # -- public ---------------------------------------------------------------------------------
    def acquire(self, layer: int, expert: int):
        """The expert's matrices, pinned until release(). ckpt-0: int8 gate [D, F] and up [D, F]
        as in the file, and down transposed to [D, F] (output-major; the file's [F, D] is its .T).
        A GGUF: gate, up, down as GMatrix views of the file's bytes."""
        key = (layer, expert)
        with self.lock:
            i = self.where.get(key)
            if i is None:
                i = self._claim(key, prefetched=False)
            s = self._account(key, i)
            s.refs += 1
        if not s.ready.is_set():
            t = time.perf_counter()
            s.ready.wait()
            self.stats.stall_seconds += time.perf_counter() - t
        if s.error is not None:
            self.release(layer, expert)
            raise s.error
        return self._views(i)

    def note_used(self, layer: int, experts: list) -> None:
        """A kernel read these resident experts of `layer` without acquire() (see slot_of). They
        are counted, with acquire()'s statistics and recency in the order of use, before the
        cache next claims a slot or accounts a use, or on flush_used()."""
        self._used.append((layer, experts))          # (list.append is atomic)

    def flush_used(self) -> None:
        with self.lock:
            self._flush_used()

    def _flush_used(self) -> None:
        """Caller holds the lock."""
        while self._used:
            layer, experts = self._used.pop(0)
            for e in experts:
                self._account_now((layer, e), self.where[(layer, e)])

    def _account(self, key, i: int) -> "_Slot":
        """A use of `key` in slot i: hit or miss statistics and recency. Caller holds the lock."""
        self._flush_used()
        return self._account_now(key, i)

    def _account_now(self, key, i: int) -> "_Slot":
        s = self.slots[i]
        st, layer = self.stats, key[0]
        if s.used:
            st.hits[layer] += 1
        elif s.prefetched:
            st.prefetch_hits[layer] += 1
        else:                             # loaded on demand (by request() or by acquire just now)
            st.misses[layer] += 1
        s.used = True
        s.last_step = self.step
        self.policy.touch(key)
        return s

    def ready(self, layer: int, expert: int) -> bool:
        """Whether acquire() would return at once (the expert is resident and loaded)."""
        i = self.where.get((layer, expert))
        return i is not None and self.slots[i].ready.is_set()

    def ready_first(self, layer: int, experts: list) -> list:
        """The layer's experts with those already in RAM first (stable): computing them first
        overlaps their compute with the others' reads."""
        return sorted(experts, key=lambda e: not self.ready(layer, e))

    def release(self, layer: int, expert: int) -> None:
        with self.lock:
            i = self.where.get((layer, expert))
            if i is not None and self.slots[i].refs > 0:
                self.slots[i].refs -= 1

    def request(self, keys) -> None:
        """Start reading every missing expert a layer needs now, all at once (they overlap)."""
        keys = list(keys)
        where = self.where
        if all(key in where for key in keys):     # all resident or on their way: nothing to do
            return
        with self.lock:
            for key in keys:
                if key not in self.where and self._claim(key, prefetched=False, wait=False,
                                                         protect=set(keys)) is None:
                    break                 # no room for more now: acquire() reads the rest in turn

    def next_step(self) -> None:
        """Mark the start of a forward step (guesses may only evict what this step has not used)."""
        self.step += 1

    def prefetch(self, keys, only_if_idle: bool = False, force: bool = False) -> None:
        """Guess: start loading these experts if a slot is free or holds one not used since the
        previous step. Guessing turns itself off while fewer than half the guesses are used.
        only_if_idle: guess only while no read is in flight and only into a free slot, so a
        guess never takes disk bandwidth from a read the model waits for, nor evicts an expert
        (decode uses it: there a wrong guess's eviction cost more than right guesses saved).
        force: guess even with prefetch off (prefill: see model._fetch_experts)."""
        if not (self.prefetch_enabled or force):
            return
        if only_if_idle and self.stats.inflight:
            self.stats.guessing_paused += 1
            return
        st = self.stats
        issued, useful = sum(st.prefetch_issued), sum(st.prefetch_hits)
        if issued >= self.GUESS_WARMUP and useful < 0.5 * issued:
            st.guessing_paused += 1
            return
        with self.lock:
            for key in keys:
                if key in self.where:
                    continue
                # stale_before=-1: no slot is stale enough, only a free one will do
                stale = -1 if only_if_idle else self.step - 1
                if self._claim(key, prefetched=True, wait=False, stale_before=stale) is None:
                    break
                st.prefetch_issued[key[0]] += 1

    def pin(self, keys) -> None:
        """Load these experts now and keep them resident for good."""
        keys = list(dict.fromkeys(keys))
        if len(keys) > self.nslots - self.k:
            raise GrokError(f"cannot pin {len(keys)} experts: the budget holds {self.nslots} and "
                            f"{self.k} must stay free", hint="pin fewer experts or raise --expert-cache-gb")
        for key in keys:
            self.acquire(*key)
            with self.lock:
                self.pinned.add(key)
            self.release(*key)

    def resident(self) -> int:
        with self.lock:
            return len(self.where)

    def close(self) -> None:
        """Finish the reads in flight, close the files and give the pool's RAM back now (not when
        a garbage collection finds the model's reference cycles)."""
        self.io.shutdown(wait=True)
        self.flush_page_cache()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.pool = self.pool_view = None
        self._slot_views = [None] * self.nslots

    # -- internals ------------------------------------------------------------------------------
    def _views(self, i: int):
        views = self._slot_views[i]
        if views is None:
            views = self._slot_views[i] = self._make_views(i)
        return views

    def _make_views(self, i: int):
        if self.gguf:               # typed as its layer's matrices: made for each expert loaded
            return self.ckpt.expert_matrices(*self.slots[i].key, self.pool_view[i])
        return list(self.pool_view[i].reshape(self.slot_shape))

    def _claim(self, key, prefetched: bool, wait: bool = True, stale_before: int | None = None,
               protect=()):
        """Give `key` a slot (free, or evicted) and start its read. Caller holds the lock."""
        self._flush_used()              # recency first: the victim is chosen from it
        i = self._free_slot(wait, stale_before, protect)
        if i is None:
            return None
        s = self.slots[i]
        if s.key is not None:
            old = s.key
            del self.where[old]
            self.slot_of[old] = -1
            self.policy.remove(old)
            self.stats.evictions[old[0]] += 1
            if s.prefetched and not s.used:
                self.stats.prefetch_wasted[old[0]] += 1
        if self.gguf:
            self._slot_views[i] = None
        s.key, s.refs, s.error, s.prefetched, s.used, s.last_step = key, 0, None, prefetched, False, self.step
        s.ready.clear()
        self.where[key] = i
        self._start_load(i, key)
        return i

    def _free_slot(self, wait: bool, stale_before: int | None = None, protect=()):
        while True:
            evictable = {}
            for i, s in enumerate(self.slots):
                if s.key is None:
                    return i
                if s.refs == 0 and s.ready.is_set() and s.key not in self.pinned and s.key not in protect and (
                        stale_before is None or (s.used and s.last_step < stale_before)):
                    evictable[s.key] = i
            if evictable:
                return evictable[self.policy.victim(evictable)]
            if not wait:
                return None
            loading = [s for s in self.slots if not s.ready.is_set()]
            if not loading:
                raise GrokError("every expert cache slot is in use", hint="raise --expert-cache-gb")
            self.lock.release()           # let the reads finish, then look again
            try:
                loading[0].ready.wait()
            finally:
                self.lock.acquire()

    def _drop_later(self, key) -> None:
        """Drop the file pages of the reads before this one, and queue this one's.

        Read-ahead may still be landing pages past a range when its read returns, so a range is
        dropped (with READ_AHEAD_SLACK past its end) one read later: at most the latest reads
        linger in the page cache, never an accumulation.
        """
        with self.lock:
            old, self._pending_drop = self._pending_drop, [key]
        for k in old:
            self._drop_now(k)

    def _drop_now(self, key) -> None:
        for part in self.ranges[key]:
            for path, foff, n in part:
                os.posix_fadvise(self._fd(path), foff, n + self.READ_AHEAD_SLACK, os.POSIX_FADV_DONTNEED)

    def flush_page_cache(self) -> None:
        """Drop the pages of the latest reads now (close() does it too)."""
        with self.lock:
            old, self._pending_drop = self._pending_drop, []
        if self.drop_page_cache:
            for k in old:
                self._drop_now(k)

    def _fd(self, path: str, direct: bool = False) -> int:
        fd = self._fds.get((path, direct))
        if fd is None:
            with self.lock:
                fd = self._fds.get((path, direct))
                if fd is None:
                    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                    if not direct and hasattr(os, "posix_fadvise"):   # large read-ahead: one long run each
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    self._fds[(path, direct)] = fd
        return fd

    def _read(self, fd: int, path: str, offset: int, dst, need: int, key) -> None:
        """Read into dst from offset until `need` bytes are in (preadv may return short counts)."""
        got = 0
        while got < need:
            r = os.preadv(fd, [dst[got:]], offset + got)
            if r <= 0:
                raise GrokError(f"{path}: unexpected end of file reading expert {key}",
                                hint="the checkpoint file is truncated; re-download it")
            got += r

    def _read_bytes(self, path: str, offset: int, n: int, key, dst=None):
        """n bytes of the file at offset: into dst if given (buffered reads only), else a view of
        this reader's scratch. Direct reads cover the aligned blocks around the range; a file
        system that refuses them gets buffered reads from then on."""
        if self.direct and path not in self._buffered:
            a0 = offset // self.ALIGN * self.ALIGN
            a1 = -(-(offset + n) // self.ALIGN) * self.ALIGN
            buf = self._scratch_buf(a1 - a0)
            try:
                self._read(self._fd(path, True), path, a0, memoryview(buf[:a1 - a0]), offset + n - a0, key)
                return buf[offset - a0:offset - a0 + n]
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._buffered.add(path)
        if dst is None:
            dst = self._scratch_buf(n)[:n]
        self._read(self._fd(path), path, offset, memoryview(dst).cast("B"), n, key)
        return dst

    def _scratch_buf(self, n: int):
        """This reader thread's byte buffer of at least n bytes, on 2 MiB boundaries: huge pages,
        which a direct read pins for the device in a fraction of the time 4 KiB pages take."""
        buf = getattr(self._scratch, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._scratch.buf = _aligned_empty(max(n, self.READ_CHUNK), self.HUGE)
        return buf

    def _start_load(self, i: int, key) -> None:
        """Queue slot i's reads, READ_CHUNK at a time: the parts' segments end to end into the
        slot (ckpt-0: gate and up; down's rows go transposed). Caller holds the lock."""
        st = self.stats
        if st.inflight == 0:              # wall time with at least one load in flight
            st.busy_since = time.perf_counter()
        st.inflight += 1
        parts = self.ranges[key]
        step = self.piece
        pieces, soff = [], 0
        for segs in (parts if self.gguf else parts[:2]):
            for path, foff, n in segs:
                pieces += [(path, foff + o, soff + o, min(step, n - o), None) for o in range(0, n, step)]
                soff += n
        if not self.gguf:
            (dp, doff, dn), = parts[2]
            D, F = self.slot_shape[1:]
            rows = self.down_rows
            pieces += [(dp, doff + r0 * D, None, min(rows, F - r0) * D, r0) for r0 in range(0, F, rows)]
            soff += dn
        load = _Load(i, key, len(pieces), soff)
        for piece in pieces:
            self.io.submit(self._read_piece, load, *piece)

    def _read_piece(self, load: "_Load", path: str, foff: int, soff, n: int, r0) -> None:
        """One piece of a load: into the slot at byte soff, or (r0 set) rows r0.. of the down
        projection, transposed into place."""
        s = self.slots[load.slot]
        try:
            if s.error is None:
                slot = self.pool[load.slot]
                if r0 is None:
                    dst = slot.view(np.uint8)[soff:soff + n]
                    got = self._read_bytes(path, foff, n, load.key, dst)
                    if got is not dst:
                        copy_into(got, dst)
                else:
                    got = self._read_bytes(path, foff, n, load.key).view(np.int8)
                    down = slot.reshape(self.slot_shape)[2]
                    transpose_into(got.reshape(-1, down.shape[0]), down, r0)
        except Exception as e:             # surfaced to the thread that waits for this slot
            s.error = e if isinstance(e, GrokError) else GrokError(f"reading expert {load.key} failed: {e}")
        if load.piece_done():
            self._finish_load(load)

    def _finish_load(self, load: "_Load") -> None:
        i, key = load.slot, load.key
        s = self.slots[i]
        if s.error is None and self.drop_page_cache and (not self.direct or self._buffered):
            try:
                self._drop_later(key)
            except OSError:
                pass
        now = time.perf_counter()
        with self.lock:
            self.stats.bytes_read[key[0]] += load.nbytes if s.error is None else 0
            self.stats.read_seconds += now - load.started
            self.stats.inflight -= 1
            if self.stats.inflight == 0:
                self.stats.io_busy_seconds += now - self.stats.busy_since
        if s.error is None:
            self.slot_of[key] = i
        s.ready.set()
        if s.error is not None:
            with self.lock:
                if self.where.get(key) == i:
                    del self.where[key]
                    self.policy.remove(key)
                s.key = None


def _aligned_empty(nbytes: int, align: int) -> np.ndarray:
    """n uninitialized bytes starting on a multiple of `align` (np.empty: pages are committed
    as they are first written)."""
    raw = np.empty(nbytes + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + nbytes]


class _Load:
    """One expert's reads in flight (nbytes in all): the last piece to finish completes the load."""
    __slots__ = ("slot", "key", "left", "nbytes", "started", "_lock")

    def __init__(self, slot: int, key, pieces: int, nbytes: int):
        self.slot, self.key, self.left, self.nbytes = slot, key, pieces, nbytes
        self.started = time.perf_counter()
        self._lock = threading.Lock()

    def piece_done(self) -> bool:
        with self._lock:
            self.left -= 1
            return self.left == 0


class _Stats:
    def __init__(self, L: int):
        self.hits = [0] * L
        self.misses = [0] * L
        self.prefetch_hits = [0] * L
        self.prefetch_issued = [0] * L
        self.prefetch_wasted = [0] * L
        self.evictions = [0] * L
        self.guessing_paused = 0         # guesses skipped because too few were being used
        self.bytes_read = [0] * L
        self.read_seconds = 0.0          # summed over reads (overlapping reads both count)
        self.io_busy_seconds = 0.0       # wall time with at least one read in flight
        self.stall_seconds = 0.0         # compute waiting for a read
        self.inflight = 0
        self.busy_since = 0.0

    def as_dict(self, cache: ExpertCache) -> dict:
        cache.flush_used()
        per_layer = [{"hits": self.hits[i], "misses": self.misses[i], "prefetch_hits": self.prefetch_hits[i],
                      "prefetch_issued": self.prefetch_issued[i], "prefetch_wasted": self.prefetch_wasted[i],
                      "evictions": self.evictions[i], "bytes_read": self.bytes_read[i]}
                     for i in range(len(self.hits))]
        tot = {k: sum(d[k] for d in per_layer) for k in per_layer[0]}
        lookups = tot["hits"] + tot["misses"] + tot["prefetch_hits"]
        return {
            **tot,
            "lookups": lookups,
            "hit_rate": (tot["hits"] + tot["prefetch_hits"]) / lookups if lookups else 0.0,
            "read_seconds": self.read_seconds,
            "io_busy_seconds": self.io_busy_seconds,
            "read_gb_s": tot["bytes_read"] / GB / self.io_busy_seconds if self.io_busy_seconds else 0.0,
            "stall_seconds": self.stall_seconds,
            "budget_bytes": cache.budget_bytes,
            "slots": cache.nslots,
            "resident": cache.resident(),
            "expert_bytes": cache.expert_bytes,
            "policy": cache.policy.name,
            "prefetch": cache.prefetch_enabled,
            "guesses_skipped": self.guessing_paused,
            "per_layer": per_layer,
        }


def ram_terms(ckpt, context: int, ram: tuple[int, int] | None = None, margin_fraction: float = 0.03,
              min_margin: float = 1 * GB) -> dict:
    """auto_budget's terms, in bytes: total and available RAM, the non-expert bytes still to be
    held, the KV cache, and the safety margin (3 % of total RAM, at least 1 GB).

    ram=(total, available) plans for an assumed machine instead of this one: none of the
    checkpoint is in its RAM yet, so every non-expert byte counts (here, the ones already read
    are out of `available`)."""
    import psutil
    if ram is None:
        mem = psutil.virtual_memory()
        total, avail, read = mem.total, mem.available, ckpt.resident_bytes
    else:
        (total, avail), read = ram, 0
    return {"total": int(total), "available": int(avail),
            "resident_non_expert": ckpt.nbytes - ckpt.all_expert_bytes - read,
            "kv_cache": ckpt.config.kv_cache_bytes(context),
            "margin": int(max(min_margin, margin_fraction * total))}


def auto_budget(ckpt, context: int, margin_fraction: float = 0.03, min_margin: float = 1 * GB,
                share: int = 1, terms: dict | None = None) -> int:
    """What `auto` picks: available RAM minus dense weights, KV cache and a safety margin
    (ram_terms), clamped to [experts one token needs, every expert]. Sizes are the
    checkpoint's own (a GGUF's in its ggml types). Dense weights the checkpoint has already
    read into RAM are out of `available` already, so only the rest counts. With `share` models
    on the machine (Ray workers), each gets 1/share of (available - margin). `terms`: ram_terms'
    figures, when the caller has them already (memory_plan's, perhaps of an assumed machine).

    The margin is a share of the machine, not of what is free: 10 % of the free RAM left the
    kernel's page cache 2.4 GB more for experts than the cache on a 24 GB machine (mmap then
    missed less), and would keep 25 GB idle on a 256 GB workstation."""
    c = ckpt.config
    t = terms or ram_terms(ckpt, context, None, margin_fraction, min_margin)
    expert = ckpt.expert_bytes
    every = c.num_layers * c.num_experts * expert           # a slot for every expert
    budget = (t["available"] - t["margin"]) / share - t["resident_non_expert"] - t["kv_cache"]
    return int(max(c.num_selected_experts * expert, min(every, budget)))


def budget_bytes(value, ckpt, context: int, terms: dict | None = None) -> int:
    """The budget in bytes for a validated expert_cache_gb ('auto' or GB; see options.py)."""
    return auto_budget(ckpt, context, terms=terms) if value == "auto" else int(value * GB)
