"""Run onnxruntime on an untrusted graph where it cannot take the audit down.

onnxruntime is C++: a hostile graph can crash it (a segfault is not an
exception), make it run forever or allocate without bound. Every place that
hands a model to onnxruntime (sessions, its calibration, its quantization
tools and their shape inference) goes through ``call``: the function runs in
a fresh process under a memory limit (RLIMIT_AS) and a time limit; the parent
gets the return value, or an AuditError with one line::

    onnxruntime crashed (SIGSEGV) on this model
    onnxruntime ran out of time (20 s) on this model
    onnxruntime ran out of memory (limit 8.0 GiB) on this model

An AuditError raised in the child comes back as itself; any other exception
of the child comes back as a one-line AuditError naming its type.

Limits: ``WMAUDIT_ISOLATE_TIMEOUT`` (seconds, default 600: real static
quantization of a large model takes minutes), ``WMAUDIT_ISOLATE_MEMORY``
(bytes of address space, default 8 GiB). ``bench/bench_isolation.py``
measures the cost per call.

The child is forked from multiprocessing's ``forkserver``: a single-threaded
server process that imported onnx, onnxruntime and the auditor modules that
call onnxruntime once (``PRELOAD``), so a child pays a fork instead of an
interpreter start and those imports, and inherits none of the parent's
threads or sessions. The child takes the caller's environment and working
directory, as a spawned process would. ``forkserver_context`` is the one
context; ``auditor.forensics.sweep`` starts its per-file children from it too.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

from auditor.errors import AuditError

__all__ = ["call", "timeout_s", "memory_bytes", "forkserver_context", "limit_address_space"]

# Imported once by the forkserver (module names only: nothing is imported here). One list for
# every user of the server (isolated onnxruntime calls and the sweep's per-file children): the
# server starts with its first child and cannot import more afterwards, so a module missing here
# would be imported by each child, under that child's memory limit.
PRELOAD = ["numpy", "numpy.random", "numpy.ma", "scipy.linalg", "scipy.optimize", "onnx", "onnxruntime",
           "onnxruntime.quantization", "auditor.backends.isolate", "auditor.data.accuracy",
           "auditor.data.calibration", "auditor.attacks.quantize", "auditor.attacks.precision",
           "auditor.read.weights", "auditor.read.layout", "auditor.marks.whitebox", "auditor.marks.evidence",
           "auditor.forensics.canon", "auditor.forensics.align", "auditor.forensics.scan",
           "auditor.forensics.sweep"]
_CTX = None


def forkserver_context(extra_preload=()):
    """multiprocessing's forkserver context with ``PRELOAD`` (+ ``extra_preload``) imported by
    the server. The server starts with the first child; modules named after that are
    imported by the children that need them."""
    global _CTX
    ctx = multiprocessing.get_context("forkserver")
    wanted = list(dict.fromkeys(PRELOAD + list(extra_preload)))
    if _CTX is None or extra_preload:
        ctx.set_forkserver_preload(wanted)
        _CTX = ctx
    return _CTX

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MEMORY = 8 << 30


def timeout_s() -> float:
    v = os.environ.get("WMAUDIT_ISOLATE_TIMEOUT")
    try:
        return float(v) if v else DEFAULT_TIMEOUT_S
    except ValueError:
        raise AuditError(f"WMAUDIT_ISOLATE_TIMEOUT={v!r} is not a number of seconds") from None


def memory_bytes() -> int:
    v = os.environ.get("WMAUDIT_ISOLATE_MEMORY")
    try:
        return int(v) if v else DEFAULT_MEMORY
    except ValueError:
        raise AuditError(f"WMAUDIT_ISOLATE_MEMORY={v!r} is not a number of bytes") from None


def limit_address_space(memory: int) -> None:
    """Cap this process's address space at ``memory`` bytes (never above a hard limit already set)."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):
        pass


def _child(conn, fn: Callable, args: tuple, kwargs: dict, memory: int, env: dict | None = None,
           cwd: str | None = None) -> None:
    if env is not None:  # the caller's, as a spawned process would have it
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            pass

    limit_address_space(memory)
    try:
        result = ("ok", fn(*args, **kwargs))
    except AuditError as e:
        result = ("audit", str(e))
    except MemoryError:
        result = ("memory", "")
    except BaseException as e:  # noqa: BLE001 - everything the child raises is reported as one line
        text = str(e).strip()
        result = ("error", f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": "))
    try:
        conn.send(result)
    except Exception as e:  # an unpicklable result
        conn.send(("error", f"result cannot be sent back ({type(e).__name__})"))
    conn.close()


def killed_by_signal(code: int | None, what: str, where: str) -> str | None:
    """The one line for a child that a signal ended (exit code -N), None for any other ending:
    SIGKILL is most often the kernel's out-of-memory killer."""
    if code is None or code >= 0:
        return None
    if -code == signal.SIGKILL:
        return f"{what} was killed (out of memory?) {where}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"{what} crashed ({name}) {where}"


def call(fn: Callable[..., Any], *args: Any, what: str = "onnxruntime", timeout: float | None = None,
         memory: int | None = None, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a fresh process under time and memory limits (see the module doc).

    fn must be a module-level function; arguments and result are pickled. In a daemonic
    process (which may not start children) fn runs in-process.
    """
    if multiprocessing.current_process().daemon:
        return fn(*args, **kwargs)
    timeout = timeout_s() if timeout is None else timeout
    memory = memory_bytes() if memory is None else memory
    ctx = forkserver_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs, memory, dict(os.environ), os.getcwd()),
                       daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise AuditError(f"{what} ran out of time ({timeout:g} s) on this model")
        try:
            status, value = recv.recv()
        except (EOFError, OSError):
            proc.join(5)
            code = proc.exitcode
            raise AuditError(killed_by_signal(code, what, "on this model")
                             or f"{what} exited without a result (exit {code}) on this model") from None
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
    if status == "ok":
        return value
    if status == "audit":
        raise AuditError(value)
    if status == "memory":
        raise AuditError(f"{what} ran out of memory (limit {memory / (1 << 30):.1f} GiB) on this model")
    raise AuditError(f"{what} failed on this model: {value}")
