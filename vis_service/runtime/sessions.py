"""onnxruntime sessions, built once per (model, purpose) and kept in a bounded LRU cache.

A *purpose key* says what graph the session runs: e.g. ("expose", tensors) for
activations or ("gradient", objectives, wrt, rule set) for a backward graph.
Building a graph and creating a session is expensive (and fusions are decided at
creation), so requests never do it twice for the same key.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import itertools
import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from ..errors import Cancelled, InvalidArgument, ResourceExhausted
from ..graph.hints import EXECUTION_ORDER, FORWARD_FIRST, get_hint
from ..graph.weights import session_bytes, structure_only
from .providers import CPU, ProviderChoice, select_provider

log = logging.getLogger(__name__)

_bound = threading.local()   # the RunControl of the method running on this thread, if any


class RunControl:
    """Cancellation of the onnxruntime runs one request makes.

    `cancel()` (from any thread: the gRPC cancellation callback) sets onnxruntime's
    RunOptions.terminate, which ends a run in flight within about one kernel, and every later
    run on a thread the control is `bound()` to raises Cancelled at once. Without it a cancelled
    call finished its current run (seconds for a 64-row SmoothGrad batch) while the client went
    on: the runs of successive cancelled calls overlapped and onnxruntime's memory arena grew to
    hold them all (a server killed for memory after a few dozen cancels).
    """

    def __init__(self):
        self.options = ort.RunOptions()
        self.options.log_severity_level = 4   # a terminated run is expected, not an error to log
        self._cancelled = threading.Event()
        self.expired: str | None = None   # why the run watchdog ended a run (RunWatchdog)

    def cancel(self) -> None:
        self._cancelled.set()
        self.options.terminate = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expire(self, reason: str) -> None:
        """End the run in flight, and refuse later ones, for a server limit (not the client)."""
        self.expired = reason
        self.options.terminate = True

    def unexpire(self) -> None:
        """The run the watchdog ended had returned already: later runs may go on."""
        self.expired = None
        self.options.terminate = self.cancelled

    @contextmanager
    def bound(self):
        """Runs on this thread (sessions' run / run_dict / run_into) obey this control."""
        previous = getattr(_bound, "control", None)
        _bound.control = self
        try:
            yield self
        finally:
            _bound.control = previous


def _current_control() -> RunControl | None:
    return getattr(_bound, "control", None)


class RunWatchdog:
    """Ends every onnxruntime run that lasts longer than `seconds` (through its RunControl).

    A graph can run for ever (a Loop of 10^12 trips, 0.9 KB uploaded): it held its run slot, and
    with --max-concurrent-runs such runs held all of them, until the client's deadline or cancel,
    and a client with neither never let go. One thread for every run of a Runtime, started on the
    first run and waiting for the earliest deadline."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._cond = threading.Condition()
        self._watched: dict[int, tuple[float, RunControl]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, control: RunControl) -> int:
        with self._cond:
            token = next(self._tokens)
            idle = not self._watched
            self._watched[token] = (time.monotonic() + self.seconds, control)
            if self._thread is None:
                self._thread = threading.Thread(target=self._expire_late_runs, name="vis-run-watchdog", daemon=True)
                self._thread.start()
            elif idle:   # every deadline is the same span after its start: a later run is never the earliest
                self._cond.notify()
            return token

    def unwatch(self, token: int) -> None:
        with self._cond:
            self._watched.pop(token, None)

    def _expire_late_runs(self) -> None:
        reason = (f"an onnxruntime run took longer than the server's limit of {self.seconds:g} s per run "
                  "(--max-run-seconds); send fewer images or rows, or ask the operator to raise it")
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, control) in list(self._watched.items()):
                    if deadline <= now:
                        del self._watched[token]
                        control.expire(reason)
                earliest = min((deadline for deadline, _ in self._watched.values()), default=None)
                # at most a minute at a time: a wait of years overflows the lock's timeout
                self._cond.wait(None if earliest is None else min(max(0.0, earliest - now), 60.0))


class RunGate:
    """How many session runs are in flight, bounded by `limit` (0: no bound), and how many a
    cancellation ended early; `max_run_seconds` > 0 ends runs that last longer (RunWatchdog).
    One per Runtime, shared by its sessions."""

    def __init__(self, limit: int = 0, max_run_seconds: float = 0.0):
        self.limit = max(0, int(limit))
        self.max_run_seconds = max(0.0, float(max_run_seconds))
        self.watchdog = RunWatchdog(self.max_run_seconds) if self.max_run_seconds else None
        self._slots = threading.Semaphore(self.limit) if self.limit else None
        self._lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.terminated = 0

    def enter(self, control: RunControl | None) -> None:
        if self._slots is not None:
            while not self._slots.acquire(timeout=0.05):   # a cancelled request stops waiting too
                if control is not None and control.cancelled:
                    raise Cancelled("cancelled by the client")
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def leave(self, terminated: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.terminated += int(terminated)
        if self._slots is not None:
            self._slots.release()


@dataclass
class Session:
    """A built graph and its onnxruntime session; `meta` holds what the builder returned.

    `model` is the graph's structure only (`graph.weights.structure_only`): onnxruntime holds the
    weights. A dataclass `meta` whose `model` was the built graph gets the same structure-only copy."""

    key: tuple
    model: onnx.ModelProto
    ort_session: ort.InferenceSession
    meta: Any = None
    build_seconds: float = 0.0
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    gate: RunGate | None = None   # the runtime's bound on runs in flight
    weight_bytes: int = 0         # what its constants take in the session (graph.weights.session_bytes)
    # called with the session when its first run is refused for its input (see _controlled); set by
    # the Runtime that caches it (not a closure over the session: no cycle delays freeing it)
    discard: Callable[["Session"], None] | None = None
    has_run: bool = False

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._controlled(lambda options: self.ort_session.run(outputs, feeds, options))

    def run_dict(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.run(outputs, feeds)))

    def _controlled(self, call: Callable[[ort.RunOptions | None], Any]) -> Any:
        """`call(run_options)` inside the runtime's gate, under the thread's RunControl if any."""
        control = _current_control()
        gate = self.gate or RunGate()
        if control is None and gate.watchdog is not None:
            control = RunControl()   # a run outside a request's control (a model's load) is timed too
        options = control.options if control is not None else None
        if control is not None and control.cancelled:
            raise Cancelled("cancelled by the client")
        if control is not None and control.expired:
            raise ResourceExhausted(control.expired)
        gate.enter(control)
        terminated = False
        token = gate.watchdog.watch(control) if gate.watchdog is not None else None
        try:
            try:
                result = call(options)
            finally:
                if token is not None:
                    gate.watchdog.unwatch(token)
            if control is not None and control.expired:   # it ended just as the watchdog fired
                control.unexpire()
            self.has_run = True
            return result
        except Exception as exc:
            if control is not None and control.cancelled:   # onnxruntime's "terminate flag" error
                terminated = True
                raise Cancelled("cancelled by the client") from None
            if control is not None and control.expired:
                terminated = True
                raise ResourceExhausted(control.expired) from None
            mapped = run_error(exc)
            if isinstance(mapped, InvalidArgument) and not self.has_run and self.discard is not None:
                # a session built for this input's sizes that cannot run them (a free channel count
                # fed a wrong one, which shape inference does not judge) would only take a cache slot
                self.discard(self)
            if mapped is not None:
                raise mapped from None
            raise
        finally:
            gate.leave(terminated)

    def run_into(self, outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with each output written straight into the caller's array (onnxruntime IOBinding): no
        output allocation, no copy. The arrays must be C-contiguous and writable, with exactly the
        outputs' dtypes and shapes (onnxruntime raises otherwise). Returns `outputs`."""
        binding = self.ort_session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        self._controlled(lambda options: self.ort_session.run_with_iobinding(binding, options))
        return outputs


# onnxruntime's run errors. Every run's feeds are made from a request (its images, or copies of
# them), so onnxruntime refusing their shapes is the request's input not fitting the model: a
# dynamic-size input smaller than a kernel ("Invalid input shape" from a Conv), or of a size a Reshape
# or a broadcast of the model does not take. Kernels report the first as INVALID_ARGUMENT and the
# others through ORT_ENFORCE, as FAIL: those are told apart by their wording. A failed allocation
# (FAIL from the arena, a bad_alloc, CUDA out of memory) is a limit. Anything else stays an internal
# error.
_ALLOCATION = ("failed to allocate memory", "bad_alloc", "out of memory", "alloc_failed",
               "available memory of")   # the bounded arena: "Available memory of N is smaller than requested bytes"
_SHAPE = ("invalid input shape", "cannot be reshaped", "attempting to broadcast", "incompatible dimensions",
          "dimension mismatch", "invalid dimensions", "shape mismatch", "kernel channels", "must match",
          "is not equal to", "invalid rank", "must have the same shape")
_WINDOWED = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "MaxPool", "AveragePool",
             "LpPool", "NchwcConv", "NchwcMaxPool", "NchwcAveragePool"}
_STATUS_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
# ORT_ENFORCE's "<source file>:<line> <function signature> <condition> was false. "
_ENFORCE = re.compile(r"\S+\.(?:cc|h|cpp|cu|cuh):\d+ [^(]*\([^)]*\)\s*(?:[^.]*? was false\.\s*)?")
MAX_REASON = 300


def short_reason(exc: BaseException) -> tuple[str, str]:
    """(op type of the failing node or "", onnxruntime's message without its status prefix, source
    locations and advice), on one line and at most MAX_REASON characters."""
    text = _STATUS_PREFIX.sub("", str(exc).strip())
    op = ""
    node = _NODE.search(text)
    if node:
        op = node.group(1)
        text = f"{op} node{' ' + repr(node.group(2)) if node.group(2) else ''}: " + text[node.end():]
    text = _ENFORCE.sub("", text).replace("Please fix either the inputs/outputs or the model.", "")
    text = " ".join(text.split()).rstrip(" .")
    return op, text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def allocation_failure(exc: BaseException) -> bool:
    """An onnxruntime exception that is a failed allocation (the bounded arena, a bad_alloc)."""
    return isinstance(exc, (ort_errors.Fail, ort_errors.RuntimeException, ort_errors.EPFail)) and \
        any(p in short_reason(exc)[1].lower() for p in _ALLOCATION)


def run_error(exc: BaseException) -> Exception | None:
    """The library error an onnxruntime run exception stands for (see above), or None: internal."""
    ort_types = (ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.RuntimeException, ort_errors.EPFail)
    if not isinstance(exc, ort_types):
        return None
    op, reason = short_reason(exc)
    low = reason.lower()
    if any(p in low for p in _ALLOCATION):
        return ResourceExhausted(f"input: onnxruntime could not allocate the memory this run needs ({reason}); "
                                 "send fewer or smaller images (or a smaller `batch`)")
    if isinstance(exc, ort_errors.InvalidArgument) or (isinstance(exc, ort_errors.Fail)
                                                       and any(p in low for p in _SHAPE)):
        if "channels" in low:
            what = "the input's channels are not what the model's layers take"
        elif op in _WINDOWED or "invalid input shape" in low:
            what = ("the input is too small for the model: after the layers before it, a kernel or pooling "
                    "window of the model is larger than what reaches it; send larger images")
        else:
            what = "the model cannot run on an input of this shape (or type)"
        return InvalidArgument("input", f"{what} (onnxruntime: {reason})")
    return None


Builder = Callable[[], "tuple[onnx.ModelProto, Any]"]


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()
# a build whose graph's weights reach this size releases memory after it: below, what it frees is
# small next to the cycle collection's cost (a full test suite: +30 s collecting after every build)
RELEASE_AFTER_BYTES = 64 << 20


def release_freed_memory() -> None:
    """Free what only reference cycles hold, then hand the C heap's free pages back to the
    system (glibc's malloc_trim).

    Building a session allocates and frees a graph's weights several times over (the proto, its
    serialized bytes, onnxruntime's parse; the graph builder's objects refer to each other, so the
    proto waits for the cycle collector); glibc keeps much of that freed memory in its heap.
    Measured on a 0.5 GB VGG-11 through fifteen kinds of call: resident memory 20 GB without,
    10-14 GB with a collection and a trim after each build and eviction, for the same sessions."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_shared_arena_lock = threading.Lock()
_shared_arena: bool | None = None   # registered in this process (None: not tried yet)


def shared_cpu_arena(limit_bytes: int = 0) -> bool:
    """One CPU memory arena for every session of the process (onnxruntime's environment
    allocator), registered on first use, holding at most `limit_bytes` (0: no bound; the first
    call's bound stays); False where onnxruntime refuses it.

    With the bound, a run or a session build (onnxruntime's constant folding) that would need more
    memory is RESOURCE_EXHAUSTED where the kernel's OOM killer ended the process (a 24 GB machine): a
    ConstantOfShape or Range of 12-20 GB on a model's first request, a 2 KB upload that doubles a
    constant by Concat 34 times (64 GB, folded while its session is built). onnxruntime checks it per
    allocation, from its own accounting: measured, a 64 MiB bound let a folding reach ~2.5 GB of
    memory before it refused, a 4 GiB bound ~3.2 GB; one 8 GB allocation is refused outright.

    Each session's own arena keeps the most its runs ever took: a cache of sessions that each
    ran a SmoothGrad batch held that memory once per session (VGG-11 at batch 4: ~0.35 GB more
    per backward session). A shared arena holds what the runs in flight at once took (bounded
    by --max-concurrent-runs). Run times measured the same."""
    global _shared_arena
    with _shared_arena_lock:
        if _shared_arena is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(max(0, int(limit_bytes)), -1, -1, -1))
                _shared_arena = True
            except Exception as exc:  # noqa: BLE001 - an older build or a registered one: own arenas
                log.info("no shared CPU arena (%s); each session keeps its own", exc)
                _shared_arena = False
        return _shared_arena


def _acquire_cancellable(lock: threading.Lock, poll_s: float = 0.1) -> None:
    """Acquire `lock`, waiting for another call's build of the same session; a call cancelled
    meanwhile (its thread's RunControl) raises Cancelled and frees its work slot at once (it held
    the slot until that build ended: 14 s for a 3000-layer backward graph)."""
    control = _current_control()
    while not lock.acquire(timeout=poll_s if control is not None else -1):
        if control.cancelled:
            raise Cancelled("cancelled by the client")


class Runtime:
    """Execution provider plus the session cache shared by every request."""

    def __init__(self, provider: str = "auto", cache_size: int = 32, intra_op_threads: int = 0,
                 max_concurrent_runs: int = 0, cache_bytes: int = 0, run_memory_bytes: int = 0,
                 max_run_seconds: float = 0.0):
        """`max_concurrent_runs` > 0: at most that many session runs at once, the others wait (each
        run holds its whole graph's intermediate tensors; on a CPU every run already uses all
        cores, so more at once only multiply memory). 0: no bound.

        The cache keeps at most `cache_size` sessions and, with `cache_bytes` > 0, sessions whose
        weights (`graph.weights.session_bytes` of each built graph: onnxruntime's copies of them
        dominate a session's memory) add up to at most that many bytes; the least recently used
        go first, the newest always stays. A count alone let a 0.5 GB model's sessions (~1.5 GB
        per backward graph) grow past the machine's memory: the kernel killed the server.

        `run_memory_bytes` > 0 bounds the CPU arena all sessions' runs share (see shared_cpu_arena);
        `max_run_seconds` > 0 ends a run that lasts longer, RESOURCE_EXHAUSTED (see RunWatchdog)."""
        self.choice: ProviderChoice = select_provider(provider)
        if self.choice.note:
            log.warning("execution provider: %s (%s)", self.choice.name, self.choice.note)
        else:
            log.info("execution provider: %s", self.choice.name)
        self.cache_size = max(1, int(cache_size))
        self.cache_bytes = max(0, int(cache_bytes))
        self.intra_op_threads = intra_op_threads
        self._cache: OrderedDict[tuple, Session] = OrderedDict()
        self._cached_bytes = 0
        # unloaded models: sessions their calls still in flight build are not cached (nothing could
        # use or evict them but the LRU), until the model is loaded again (revive_model)
        self._retired: set[str] = set()
        self._lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}
        self.sessions_built = 0
        self.gate = RunGate(max_concurrent_runs, max_run_seconds)
        self.run_memory_bytes = max(0, int(run_memory_bytes))

    @property
    def provider(self) -> str:
        return self.choice.name

    def session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        # a multi-tenant server must not burn cores spinning between requests
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if shared_cpu_arena(self.run_memory_bytes):
            opts.add_session_config_entry("session.use_env_allocators", "1")
        return opts

    def session_options_for(self, model: onnx.ModelProto) -> ort.SessionOptions:
        """The session options, with what the model's graph hints ask for (see graph.hints)."""
        opts = self.session_options()
        # forward-first was measured on the CPU provider only (its in-place NCHWc residual Conv);
        # on CUDA, where memory is scarcer and that fusion differs, the default order stays
        if (get_hint(model, EXECUTION_ORDER) == FORWARD_FIRST and self.choice.name == CPU
                and hasattr(ort, "ExecutionOrder")):
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        return opts

    def create_session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), self.session_options_for(model),
                                    providers=self.choice.providers)

    def session(self, model_id: str, key: Hashable, build: Builder) -> Session:
        """The cached session for (model_id, key), building it with `build()` on a miss.

        `build` returns (model proto, meta). Concurrent requests for the same key
        wait for one build instead of building twice.
        """
        full_key = (model_id, key)
        with self._lock:
            hit = self._cache.get(full_key)
            if hit is not None:
                self._cache.move_to_end(full_key)
                return hit
            key_lock = self._building.setdefault(full_key, threading.Lock())
        _acquire_cancellable(key_lock)
        try:
            return self._session_locked(full_key, model_id, build)
        finally:
            key_lock.release()

    def _session_locked(self, full_key: tuple, model_id: str, build: Builder) -> Session:
        """session() once the build lock of `full_key` is held."""
        with self._lock:
            hit = self._cache.get(full_key)
            if hit is not None:
                self._cache.move_to_end(full_key)
                return hit
        t0 = time.perf_counter()
        try:
            model, meta = build()
            sess = self.create_session(model)
        except BaseException as exc:
            with self._lock:   # (callers waiting on key_lock hold it already and build in turn)
                self._building.pop(full_key, None)
            if allocation_failure(exc):   # constant folding past the arena's bound (shared_cpu_arena)
                raise ResourceExhausted(f"building an onnxruntime session of this model needs more memory "
                                        f"than the server's runs may take ({self.run_memory_bytes >> 20} MiB, "
                                        f"--max-run-mb): {short_reason(exc)[1]}") from None
            raise
        weight_bytes = session_bytes(model)
        # onnxruntime has its own copy of the weights now: keep the graph's structure only
        # (what is read of it from here on: inputs, outputs, names), also in the builder's meta
        light = structure_only(model)
        if dataclasses.is_dataclass(meta) and getattr(meta, "model", None) is model:
            meta = dataclasses.replace(meta, model=light)
        del model
        built = Session(full_key, light, sess, meta, time.perf_counter() - t0,
                        [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()], self.gate,
                        weight_bytes)
        built.discard = functools.partial(self._discard, full_key)
        with self._lock:
            self.sessions_built += 1
            if model_id in self._retired:
                self._building.pop(full_key, None)
                return built
            old = self._cache.pop(full_key, None)
            if old is not None:
                self._cached_bytes -= old.weight_bytes
            self._cache[full_key] = built
            self._cached_bytes += built.weight_bytes
            while len(self._cache) > 1 and (len(self._cache) > self.cache_size or (
                    self.cache_bytes and self._cached_bytes > self.cache_bytes)):
                self._cached_bytes -= self._cache.popitem(last=False)[1].weight_bytes
            self._building.pop(full_key, None)
        del sess, old   # freed (unless a run in flight holds them) before the trim
        if weight_bytes >= RELEASE_AFTER_BYTES:
            release_freed_memory()
        log.debug("built session %s in %.3fs", full_key, built.build_seconds)
        return built

    def _discard(self, full_key: tuple, session: Session) -> None:
        """Drop `session` from the cache if it is still the one cached under `full_key`."""
        with self._lock:
            if self._cache.get(full_key) is session:
                del self._cache[full_key]
                self._cached_bytes -= session.weight_bytes

    def revive_model(self, model_id: str) -> None:
        """`model_id` is (being) loaded: its sessions are cached again (see evict_model)."""
        with self._lock:
            self._retired.discard(model_id)

    def evict_model(self, model_id: str) -> None:
        """Drop the sessions of an unloaded model, and cache none built for it from now on."""
        with self._lock:
            self._retired.add(model_id)
            evicted = [self._cache.pop(k) for k in [k for k in self._cache if k[0] == model_id]]
            self._cached_bytes -= sum(s.weight_bytes for s in evicted)
        if sum(s.weight_bytes for s in evicted) >= RELEASE_AFTER_BYTES:
            del evicted
            release_freed_memory()

    @property
    def sessions_cached(self) -> int:
        with self._lock:
            return len(self._cache)

    @property
    def sessions_cached_bytes(self) -> int:
        """The cached sessions' weights, as the cache counts them (see __init__)."""
        with self._lock:
            return self._cached_bytes
