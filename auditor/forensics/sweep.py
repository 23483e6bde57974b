"""Sweeping a corpus of ONNX files against many keys.

``sweep(corpus, keys, out, ...)`` audits every ONNX file of a corpus (a
folder searched recursively, a glob, or a list file of paths) against every
key, and appends exactly one JSON line per (file, key) to a results file.

Isolation. Files come from strangers: each file's audit runs in a child
process with an address-space limit (``RLIMIT_AS``) and a wall-clock timeout,
so a file that crashes the parser, hangs it or blows up its memory becomes a
result line with ``error`` and the others go on. Children are forked from a
``forkserver`` that has the audit modules imported already (a fresh process
per file without paying an interpreter start per file), never from the
sweeping process itself.

Executors. ``local`` keeps up to ``jobs`` children running at once; ``ray``
runs one Ray task per file (``max_retries=0``), and each task runs the same
isolated child on its node. The lines are the same either way apart from
``timings``.

Crash safety. The lines of one file are appended with one ``os.write`` of
complete lines, then ``fsync``. Killed at any moment and started again with
``resume=True``, the sweep reads the file back, cuts a torn last line, and
audits only the (file, key) pairs that have no line yet: no finished result
is lost and none is written twice. Pairs are identified by the file's
absolute path and the key's commitment; a file changed in place between the
two runs is not audited again.

The audit of one file is ``audit_file(path, keys)``: the one place that says
what a sweep measures for a (file, key) pair.
"""
from __future__ import annotations

import glob
import html
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import stat
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from auditor.errors import AuditError
from auditor.marks import stats

FORMAT = "wmaudit-sweep/1"
ERROR = "error"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_MB = 4096
RAY_INSTALL = "the ray executor needs Ray: pip install 'wmaudit[ray]'"
# Test hook: the sweeping process SIGKILLs itself after writing this many lines.
KILL_AFTER_ENV = "WMAUDIT_SWEEP_KILL_AFTER"
_GLOB_CHARS = set("*?[")


# ---------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Entry:
    """One file of the corpus: its absolute path, and why it is refused unread (if it is)."""

    file: str
    refused: str | None = None


def find_corpus(corpus: str | os.PathLike) -> list[Entry]:
    """The ONNX files of a corpus, sorted, each once.

    A folder is searched recursively for names ending in ``.onnx`` or ``.ort`` (onnxruntime's ORT
    format; a
    directory or a FIFO with such a name is listed too: it becomes an error
    line, not a silent gap); symbolic links are not followed into folders,
    and a linked file whose target leaves the corpus folder is refused. A
    name with ``*``, ``?`` or ``[`` is a glob (``**`` recursive). Any other
    file not ending in ``.onnx`` / ``.ort`` is a list of paths, one a line (``#``
    comments; relative paths are relative to the list's folder).
    """
    text = os.fspath(corpus)
    p = Path(text)
    if p.is_dir():
        return _walk(p)
    if p.is_file() and p.suffix.lower() not in MODEL_SUFFIXES:
        return _list_file(p)
    if p.suffix.lower() in MODEL_SUFFIXES and (p.exists() or p.is_symlink()):
        return [Entry(os.path.abspath(text))]
    if _GLOB_CHARS & set(text):
        hits = sorted({os.path.abspath(h) for h in glob.glob(text, recursive=True)})
        if not hits:
            raise AuditError(f"corpus glob {text!r} matches no file")
        return [Entry(h) for h in hits]
    raise AuditError(f"corpus not found: {text} (a folder, a glob, or a list file of ONNX paths)")


MODEL_SUFFIXES = (".onnx", ".ort")  # ONNX files and onnxruntime's ORT format (auditor.read.ortformat)


def _walk(root: Path) -> list[Entry]:
    base = os.path.abspath(root)
    real_base = os.path.realpath(base)
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            if not name.lower().endswith(MODEL_SUFFIXES):
                continue
            path = os.path.join(dirpath, name)
            refused = None
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.commonpath([real_base, target]) != real_base:
                    refused = "symbolic link leading outside the corpus folder"
            out[path] = Entry(path, refused)
    if not out:
        raise AuditError(f"no .onnx or .ort file under {root}")
    return [out[k] for k in sorted(out)]


def _list_file(path: Path) -> list[Entry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise AuditError(f"corpus list {path} is not a text list of paths ({type(e).__name__})") from None
    where = path.parent
    files = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            files.add(os.path.abspath(where / line))
    if not files:
        raise AuditError(f"corpus list {path} names no file")
    return [Entry(f) for f in sorted(files)]


# ---------------------------------------------------------------- one file
def audit_file(path: str | os.PathLike, keys: list, alpha: float = stats.DEFAULT_ALPHA,
               policy=None) -> list[dict[str, Any]]:
    """Audit one file against every key: one dict per key, in the order of ``keys``.

    The file is scanned once with every key (``auditor.forensics.scan.scan``: no manifest,
    no names needed, function-preserving transformations undone where the graph allows),
    so each p-value is corrected for everything tried on this file: keys x marks x
    candidates x transformations. Each dict holds ``key`` (commitment), ``verdict``, ``p``
    (the key's best corrected p), ``log10_p`` (its log10, exact where p underflows),
    ``where`` (tensor, layout and what was undone for the best mark), ``evidence`` and
    ``marks`` (per mark: bits matched, BER, corrected p, location); or ``verdict: "error"``
    and ``error`` (one line) when this key cannot be judged on this file. With a release
    ``policy`` (``auditor.gate.policy.Policy``), each judged pair also gets ``gate``: the
    gate's verdict for this file and key, the ids of the requirements not met, or its error.
    """
    from auditor.forensics.scan import scan

    judged = [k for k in keys if k.whitebox]
    try:
        body = scan(path, judged, alpha=alpha) if judged else {"findings": []}
    except AuditError as e:
        _raise_if_memory(e)
        return [_error_row(k.commitment, str(e)) for k in keys]
    except MemoryError:
        raise
    except Exception as e:  # a file the reader did not expect: this file fails, not the sweep
        return [_error_row(k.commitment, one_line(e)) for k in keys]
    rows = []
    for key in keys:
        if not key.whitebox:
            rows.append(_error_row(key.commitment, "the key holds no white-box mark (sweep judges white-box marks)"))
            continue
        row = _verdict_row(key.commitment, [f for f in body["findings"] if f["key_commitment"] == key.commitment])
        if policy is not None:
            row["gate"] = gate_row(path, key, policy)
        rows.append(row)
    return rows


def gate_row(path, key, policy) -> dict[str, Any]:
    """The release gate on one (file, key): verdict and the requirements not met."""
    from auditor.gate.gate import run_gate

    try:
        body = run_gate(path, key, policy)
    except AuditError as e:
        _raise_if_memory(e)
        return {"verdict": ERROR, "error": str(e)}
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - an attack or backend failing on a stranger's file
        return {"verdict": ERROR, "error": one_line(e)}
    reqs = body.get("requirements") or []
    return {"verdict": body["verdict"], "requirements": len(reqs),
            "failed": sorted(r["id"] for r in reqs if r.get("status") != "pass")}


def _raise_if_memory(e: BaseException) -> None:
    """A reader that turns every parse failure into AuditError may be hiding the memory limit."""
    seen = e.__context__
    while seen is not None:
        if isinstance(seen, MemoryError):
            raise seen
        seen = seen.__context__


def _verdict_row(commitment: str, findings: list[dict[str, Any]]) -> dict[str, Any]:
    marks = []
    for f in findings:
        found = f.get("found")
        marks.append({"id": f["mark"], "param": f["param"], "matches": f.get("matches"), "n_bits": f["n_bits"],
                      "ber": f.get("ber"), "p_corrected": f.get("p_corrected", 1.0),
                      "log10_p": f.get("log10_p_corrected", 0.0), "verdict": f["verdict"],
                      "where": None if not found else {
                          "weight": found["weight"], "transform": found["transform"],
                          "undone": f.get("undone", []), "location": found["location"], "quant": found["quant"]}})
    best = min(findings, key=lambda f: (f.get("log10_p_corrected", 0.0), f["mark"]))
    if any(f["verdict"] == stats.DETECTED for f in findings):
        verdict = stats.DETECTED
    elif any(f["verdict"] == stats.UNREADABLE for f in findings):
        verdict = stats.UNREADABLE  # a weight that could hold the mark was not read
    elif all(f["verdict"] == stats.INSUFFICIENT for f in findings):
        verdict = stats.INSUFFICIENT
    else:
        verdict = stats.NOT_DETECTED
    found = best.get("found")
    where = None if not found else (f"{found['weight']} [{found['transform']}]; undone: "
                                    + ", ".join(best.get("undone", [])))
    return {"key": commitment, "verdict": verdict, "reason": best["reason"],
            "p": min(1.0, float(best.get("p_corrected", 1.0))), "log10_p": best.get("log10_p_corrected", 0.0),
            "where": where, "evidence": best.get("evidence", {}).get("kind"), "marks": marks}


def _error_row(commitment: str, message: str) -> dict[str, Any]:
    return {"key": commitment, "verdict": ERROR, "error": " ".join(str(message).split())}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _sha256_regular(path: str) -> tuple[str, int]:
    """sha256 and size of a regular file; AuditError for a directory, FIFO or device."""
    import hashlib

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AuditError(f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise AuditError(f"is {kind}, not an ONNX file" if kind.startswith("a ") else kind)
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return "sha256:" + h.hexdigest(), st.st_size
    finally:
        os.close(fd)


# ---------------------------------------------------------------- isolation
@dataclass(frozen=True)
class Limits:
    """Per-file limits: wall-clock seconds and address space (MB, 0 = none) of the child."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass
class Task:
    """One file to audit against the keys it has no line for yet."""

    file: str
    keys: list
    alpha: float = stats.DEFAULT_ALPHA
    limits: Limits = field(default_factory=Limits)
    policy: Any = None


def _child_main(conn, task: Task) -> None:
    """Runs in the child: limits first, then hash + audit; sends one message back."""
    # Whatever a library prints while reading a stranger's file must not reach the
    # sweep's own output (its --json document on stdout, one-line errors on stderr).
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if task.limits.memory_mb:
        lim = int(task.limits.memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    t0 = time.perf_counter()
    sha, size = None, None
    try:
        sha, size = _sha256_regular(task.file)
        msg: dict[str, Any] = {"rows": audit_file(task.file, task.keys, task.alpha, task.policy)}
    except AuditError as e:
        msg = {"error": str(e)}
    except MemoryError:
        msg = {"error": f"memory limit of {task.limits.memory_mb} MB exceeded"}
    except Exception as e:  # noqa: BLE001 - anything a hostile file provokes is this file's result
        # a library loaded late cannot be mapped once the address space is spent: the same limit
        mapped = isinstance(e, (ImportError, OSError)) and any(
            s in str(e) for s in ("failed to map segment", "Cannot allocate memory"))
        msg = {"error": f"memory limit of {task.limits.memory_mb} MB exceeded" if mapped and task.limits.memory_mb
               else one_line(e)}
    msg.update(sha256=sha, size=size, audit_s=time.perf_counter() - t0)
    try:
        try:
            conn.send(msg)
        except MemoryError:
            conn.send({"error": f"memory limit of {task.limits.memory_mb} MB exceeded",
                       "sha256": sha, "size": size, "audit_s": time.perf_counter() - t0})
        conn.close()
    except OSError:  # the sweep was killed meanwhile: nobody is waiting for this result
        pass


# Imported once by the forkserver (auditor.backends.isolate.forkserver_context, shared with
# the isolated onnxruntime calls), so a child pays a fork, not the imports.
_PRELOAD = ["auditor.forensics.sweep", "auditor.forensics.scan", "auditor.forensics.canon", "auditor.forensics.align",
            "auditor.marks.evidence", "auditor.marks.whitebox", "auditor.read.weights", "auditor.read.layout",
            "scipy.optimize", "scipy.linalg"]


def _context():
    """The forkserver context; its server imports the audit modules once."""
    from auditor.backends.isolate import forkserver_context

    # In a Ray worker the child re-imports the worker's main script; having ray
    # imported in the server makes that cheap.
    return forkserver_context(_PRELOAD + (["ray"] if "ray" in sys.modules else []))


class Child:
    """One file's audit in a child process; ``outcome()`` is None while it runs."""

    def __init__(self, task: Task):
        ctx = _context()
        self.task = task
        self.conn, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, args=(send, task), daemon=True)
        self.proc.start()  # the first start also starts the forkserver: not the file's time
        send.close()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + task.limits.timeout_s

    @property
    def waitables(self) -> list:
        return [self.conn, self.proc.sentinel]

    def outcome(self) -> dict[str, Any] | None:
        msg = None
        if self.conn.poll():
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = None
            self.proc.join(5)
            if self.proc.is_alive():  # answered but does not exit: it gets no more time
                self.proc.kill()
                self.proc.join(5)
            if msg is None:
                msg = self._died()
        elif not self.proc.is_alive():
            msg = self._died()
        elif time.monotonic() >= self.deadline:
            self.proc.kill()
            self.proc.join(5)
            msg = {"error": f"time limit of {self.task.limits.timeout_s:g} s exceeded"}
        else:
            return None
        self.conn.close()
        msg["wall_s"] = time.monotonic() - self.t0
        return msg

    def _died(self) -> dict[str, Any]:
        self.proc.join(5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"killed by {name}"
        else:
            how = f"exited with status {code}"
        return {"error": f"audit process {how} (limits: {self.task.limits.timeout_s:g} s, "
                         f"{self.task.limits.memory_mb} MB)"}


def run_isolated(task: Task) -> dict[str, Any]:
    """Audit one file in a limited child and wait for it: the unit of work of every executor."""
    child = Child(task)
    while True:
        out = child.outcome()
        if out is not None:
            return out
        multiprocessing.connection.wait(child.waitables, timeout=max(0.0, child.deadline - time.monotonic()))


# ---------------------------------------------------------------- executors
def run_local(tasks: Iterable[Task], jobs: int, emit: Callable[[Task, dict], None]) -> None:
    """Up to ``jobs`` isolated children at once; ``emit`` gets each outcome as it comes."""
    pending = deque(tasks)
    running: list[Child] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                running.append(Child(pending.popleft()))
            wait_s = max(0.0, min(c.deadline for c in running) - time.monotonic())
            multiprocessing.connection.wait([w for c in running for w in c.waitables], timeout=wait_s)
            for c in list(running):
                out = c.outcome()
                if out is not None:
                    running.remove(c)
                    emit(c.task, out)
    finally:
        for c in running:  # interrupted: leave no child behind
            c.proc.kill()


def import_ray():
    """Ray, imported only when asked for; one line on how to install it otherwise."""
    try:
        import ray
    except ImportError:
        raise AuditError(RAY_INSTALL) from None
    return ray


def _ray_patience(limits: Limits, window: int, cpus: int) -> float:
    """How long a submitted task may take: its turn in the window, its limit, a minute of slack."""
    rounds = -(-window // max(1, cpus))
    return (rounds + 1) * limits.timeout_s + 60.0


def _ray_task(task: Task) -> dict[str, Any]:
    """A Ray task: the isolated child, on whichever node Ray chose."""
    import ray

    from auditor.backends.hardware import brief

    out = run_isolated(task)
    out["node"] = ray.get_runtime_context().get_node_id()
    out["hardware"] = brief()  # the node's, not the driver's
    return out


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A cluster address must answer a TCP connect: ray.init retries an unreachable one forever."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise AuditError(f"cannot reach Ray at {address}: {e.strerror or type(e).__name__}") from None


def run_ray(tasks: Iterable[Task], jobs: int, emit: Callable[[Task, dict], None],
            address: str | None = None) -> dict[str, Any]:
    """One Ray task per file (no retries), each running the isolated child on its node.

    Uses the Ray this process is already connected to, else connects to
    ``address``, else starts a local Ray with ``jobs`` CPUs (shut down again at
    the end). Returns what it ran on (nodes, CPUs).
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
        except Exception as e:  # noqa: BLE001 - Ray raises many types for an unreachable cluster
            raise AuditError(f"cannot start or reach Ray{' at ' + address if address else ''}: {one_line(e)}") from None
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        per_node: dict[str, int] = {}
        pending = deque(tasks)
        inflight: dict[Any, tuple[Task, float]] = {}
        window = 2 * max(1, cpus)
        while pending or inflight:
            while pending and len(inflight) < window:
                t = pending.popleft()
                inflight[remote.remote(t)] = (t, time.monotonic())
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            if not done:
                # The child's own limit ends a file's work; a task that outlives it by far
                # sits on a lost node or a stuck worker: cancel it, this file fails alone.
                now = time.monotonic()
                for ref, (t, since) in list(inflight.items()):
                    if now - since > _ray_patience(t.limits, window, cpus):
                        ray.cancel(ref, force=True)
                        inflight.pop(ref)
                        emit(t, {"error": f"Ray task gave no answer within {now - since:.0f} s"})
                continue
            for ref in done:
                t, _since = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker or node fails this file only
                    out = {"error": f"Ray task failed: {one_line(e)[:300]}"}
                node = out.pop("node", None)
                if node:
                    per_node[node] = per_node.get(node, 0) + 1
                emit(t, out)
        return {"nodes": nodes, "cpus": cpus, "files_per_node": dict(sorted(per_node.items()))}
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- the results file
def line_of(task: Task, key, out: dict[str, Any], row: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON line for one (file, key) pair."""
    line: dict[str, Any] = {"format": FORMAT, "file": task.file, "sha256": out.get("sha256"),
                            "size": out.get("size"), "key": key.commitment}
    if row is None:
        line.update(verdict=ERROR, error=out.get("error") or "no result for this key")
    else:
        line.update({k: v for k, v in row.items() if k != "key"})
    line["timings"] = {"audit_s": round(float(out.get("audit_s") or 0.0), 4),
                       "wall_s": round(float(out.get("wall_s") or 0.0), 4)}
    if out.get("hardware") is None:
        from auditor.backends.hardware import brief

        out["hardware"] = brief()  # a local child: this machine
    line["hardware"] = out["hardware"]
    return line


def _json_line(doc: dict[str, Any]) -> bytes:
    from auditor.results import _clean

    return (json.dumps(_clean(doc), sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


class ResultsFile:
    """Append-only JSON lines, one complete line per ``os.write``, fsynced; exclusive lock."""

    def __init__(self, path: str | os.PathLike, resume: bool):
        import fcntl

        self.path = Path(path)
        existed = self.path.exists()
        if existed and not resume:
            raise AuditError(f"{self.path} exists: add --resume to continue that sweep, or choose another -o")
        if existed and not self.path.is_file():
            raise AuditError(f"{self.path} is not a regular file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise AuditError(f"{self.path} is being written by another sweep") from None
        self.created = not existed
        if not existed:
            _fsync_dir(self.path.parent)
        self.lines: list[dict[str, Any]] = self._read_back() if existed else []
        self.done = {(ln["file"], ln["key"]) for ln in self.lines}
        self.written = 0
        self._kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)

    def _read_back(self) -> list[dict[str, Any]]:
        """Complete lines of an earlier run; a torn last line (no newline, or cut JSON) is cut off."""
        data = b""
        os.lseek(self.fd, 0, os.SEEK_SET)
        while chunk := os.read(self.fd, 1 << 20):
            data += chunk
        lines, good = [], 0
        while good < len(data):
            nl = data.find(b"\n", good)
            if nl < 0:
                break  # no newline: the write of this line was cut
            try:
                doc = json.loads(data[good:nl])
                ok = isinstance(doc, dict) and doc.get("format") == FORMAT and "file" in doc and "key" in doc
            except ValueError:
                ok = False
            if not ok:
                if nl == len(data) - 1:
                    break  # a damaged last line is dropped like a torn one
                raise AuditError(f"{self.path}: line {len(lines) + 1} is not a sweep result line")
            lines.append(doc)
            good = nl + 1
        if good < len(data):
            os.ftruncate(self.fd, good)
            os.fsync(self.fd)
        return lines

    def append(self, lines: list[dict[str, Any]]) -> None:
        """Complete lines (one file's keys) in one write, then fsync: a crash keeps whole lines only."""
        if self._kill_after:  # test hook: die right after the chosen line, at a line boundary
            lines = lines[: max(0, self._kill_after - self.written)]
        data = b"".join(_json_line(ln) for ln in lines)
        n = os.write(self.fd, data)
        if n != len(data):
            raise AuditError(f"{self.path}: short write (disk full?)")
        os.fsync(self.fd)
        for ln in lines:
            self.lines.append(ln)
            self.done.add((ln["file"], ln["key"]))
        self.written += len(lines)
        if self._kill_after and self.written >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        os.close(self.fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the sweep
def plan(entries: list[Entry], keys: list, done: set, alpha: float, limits: Limits,
         policy=None) -> tuple[list[Task], list[Task]]:
    """(tasks to run, refused entries as tasks) for the pairs without a line yet."""
    run, refused = [], []
    for e in entries:
        todo = [k for k in keys if (e.file, k.commitment) not in done]
        if not todo:
            continue
        (refused if e.refused else run).append(Task(e.file, todo, alpha, limits, policy))
    return run, refused


def sweep(corpus: str | os.PathLike, keys: list, out: str | os.PathLike, *, executor: str = "local",
          jobs: int | None = None, address: str | None = None, resume: bool = False,
          alpha: float = stats.DEFAULT_ALPHA, limits: Limits = Limits(), policy=None, progress=None,
          command: str | None = None) -> dict[str, Any]:
    """Audit every file of ``corpus`` against every key; returns the summary document.

    Writes ``out`` (JSON lines, appended), and beside it ``<stem>.summary.json``
    and ``<stem>.html`` (atomically). AuditError for usage errors (missing
    corpus, an existing ``out`` without ``resume``, Ray not installed).
    """
    if executor not in ("local", "ray"):
        raise AuditError(f"unknown executor {executor!r} (local or ray)")
    if not keys:
        raise AuditError("no key given (--key or --keys)")
    keys = _distinct(keys)
    entries = find_corpus(corpus)
    if executor == "ray":
        ray = import_ray()  # before anything is written: a missing Ray is a usage error
        if address and not ray.is_initialized():
            _check_reachable(address)
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    results = ResultsFile(out, resume)
    t0 = time.perf_counter()
    failed = True
    try:
        resumed = len(results.lines)
        tasks, refused = plan(entries, keys, results.done, alpha, limits, policy)
        by_commitment = {k.commitment: k for k in keys}
        total = sum(len(t.keys) for t in tasks) + sum(len(t.keys) for t in refused)
        if progress is not None:
            progress.total = total

        def emit(task: Task, outcome: dict[str, Any]) -> None:
            rows = {r["key"]: r for r in outcome.get("rows") or []}
            results.append([line_of(task, by_commitment[k.commitment], outcome, rows.get(k.commitment))
                            for k in task.keys])
            if progress is not None:
                progress.advance(len(task.keys), note=os.path.basename(task.file))

        refused_why = {e.file: e.refused for e in entries if e.refused}
        for t in refused:
            emit(t, {"error": refused_why[t.file]})
        ran_on: dict[str, Any] = {}
        if executor == "ray":
            if tasks:
                ran_on = run_ray(tasks, jobs, emit, address=address)
        else:
            run_local(tasks, jobs, emit)
        wall = time.perf_counter() - t0
        files_run = len(tasks) + len(refused)
        run_info = {"executor": executor, "jobs": jobs, "address": address, **ran_on,
                    "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
                    "alpha": alpha, "policy": getattr(policy, "name", None) if policy is not None else None,
                    "resumed_lines": resumed, "new_lines": total,
                    "files_this_run": files_run, "wall_s": round(wall, 3),
                    "files_per_minute": round(60.0 * files_run / wall, 1) if wall > 0 and files_run else None}
        doc = summary(results.lines, entries, keys, corpus=str(corpus), out=str(out), run=run_info,
                      command=command)
        failed = False
    finally:
        results.close()
        if failed and results.created and not results.lines:
            results.path.unlink(missing_ok=True)  # an error before any result: leave no empty file
    write_beside(out, doc)
    return doc


def _distinct(keys: list) -> list:
    seen, out = set(), []
    for k in keys:
        if k.commitment not in seen:
            seen.add(k.commitment)
            out.append(k)
    return out


def summary(lines: list[dict[str, Any]], entries: list[Entry], keys: list, *, corpus: str, out: str,
            run: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """The summary document (``wmaudit-result/1``, kind ``sweep``) of a results file."""
    from auditor.results import envelope

    wanted = {(e.file, k.commitment) for e in entries for k in keys}
    mine = [ln for ln in lines if (ln["file"], ln["key"]) in wanted]
    verdicts: dict[str, int] = {}
    for ln in mine:
        verdicts[ln["verdict"]] = verdicts.get(ln["verdict"], 0) + 1
    detected = sorted(({"file": ln["file"], "sha256": ln.get("sha256"), "key": ln["key"], "p": ln.get("p"),
                        "log10_p": ln.get("log10_p"), "where": ln.get("where")}
                       for ln in mine if ln["verdict"] == stats.DETECTED),
                      key=lambda d: (d["file"], d["key"]))
    errors = sorted({ln["file"] for ln in mine if ln["verdict"] == ERROR})
    gates: dict[str, int] = {}
    for ln in mine:
        if isinstance(ln.get("gate"), dict):
            g = ln["gate"].get("verdict")
            gates[g] = gates.get(g, 0) + 1
    body = {"corpus": corpus, "results": out, "files": len(entries), "keys": [k.commitment for k in keys],
            "pairs": len(wanted), "lines": len(mine), "complete": len(mine) == len(wanted),
            "verdicts": dict(sorted(verdicts.items())), "detected": detected, "files_with_errors": errors,
            "gate": dict(sorted(gates.items())) if gates else None,
            "run": run}
    return envelope("sweep", command=command, result=body)


def write_beside(out: str | os.PathLike, doc: dict[str, Any]) -> tuple[Path, Path]:
    """``<stem>.summary.json`` and ``<stem>.html`` next to the results file, written atomically."""
    from auditor.results import write_result

    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    js, page = out.with_name(f"{stem}.summary.json"), out.with_name(f"{stem}.html")
    write_result(js, doc)
    lines = ResultsReader(out).lines()
    tmp = page.with_name(f".{page.name}.tmp{os.getpid()}")
    tmp.write_text(render_index(doc, lines), encoding="utf-8")
    os.replace(tmp, page)
    return js, page


class ResultsReader:
    """Read-only view of a results file (complete lines only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for part in self.path.read_bytes().split(b"\n"):
            if part:
                try:
                    out.append(json.loads(part))
                except ValueError:
                    continue
        return out


# ---------------------------------------------------------------- HTML index
_CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1300px; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; } th, td { border: 1px solid #d0d0d0; padding: 3px 7px;
text-align: left; vertical-align: top; } th { background: #f3f3f3; } td.num { font-family: monospace; text-align: right; }
.mono { font-family: monospace; word-break: break-all; } .detected { color: #1b5e20; font-weight: bold; }
.error { color: #b00020; } .note { color: #555; font-size: 12px; }
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _p(v: Any, log10: Any = None) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return ""
    if v == 0.0 and isinstance(log10, (int, float)) and math.isfinite(log10):
        return f"1e{log10:.1f}"
    return f"{v:.3g}"


def render_index(doc: dict[str, Any], lines: list[dict[str, Any]]) -> str:
    """One self-contained page: counts, the detections, then every line (all text escaped)."""
    r = doc["result"]
    keys = r["keys"]
    wanted = {k for k in keys}
    rows = sorted((ln for ln in lines if ln.get("key") in wanted), key=lambda ln: (str(ln.get("file")), str(ln.get("key"))))
    counts = ", ".join(f"{_e(v)}: {n}" for v, n in r["verdicts"].items())

    def table(items: list[dict[str, Any]]) -> str:
        out = ["<table><tr><th>file</th><th>sha256</th><th>key</th><th>verdict</th><th>p</th>"
               "<th>where / error</th><th>s</th></tr>"]
        for ln in items:
            v = ln.get("verdict")
            cls = "detected" if v == stats.DETECTED else ("error" if v == ERROR else "")
            detail = ln.get("error") if v == ERROR else ln.get("where")
            g = ln.get("gate")
            if isinstance(g, dict):
                detail = f"{detail or ''}; gate {g.get('verdict')}" + (
                    f" ({', '.join(map(str, g.get('failed') or []))} not met)" if g.get("failed") else "")
            out.append(f"<tr><td class=\"mono\">{_e(ln.get('file'))}</td>"
                       f"<td class=\"mono\">{_e((ln.get('sha256') or '')[:23])}</td>"
                       f"<td class=\"mono\">{_e(str(ln.get('key'))[:23])}</td>"
                       f"<td class=\"{cls}\">{_e(v)}</td><td class=\"num\">{_e(_p(ln.get('p'), ln.get('log10_p')))}</td>"
                       f"<td class=\"mono\">{_e(detail)}</td>"
                       f"<td class=\"num\">{_e((ln.get('timings') or {}).get('wall_s'))}</td></tr>")
        out.append("</table>")
        return "\n".join(out)

    det = [ln for ln in rows if ln.get("verdict") == stats.DETECTED]
    page = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            "<title>wmaudit sweep</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
            "<h1>wmaudit sweep</h1>",
            f"<p>{r['files']} files &times; {len(keys)} keys = {r['pairs']} pairs; {r['lines']} result lines"
            f"{'' if r['complete'] else ' (incomplete)'}. {counts}.</p>",
            f'<p class="note">corpus <span class="mono">{_e(r["corpus"])}</span>; results '
            f'<span class="mono">{_e(r["results"])}</span>; command <span class="mono">{_e(doc.get("command"))}</span>; '
            f"p is Bonferroni-corrected over the candidate tensors and the key's marks; "
            f"detected when p &lt; {_e(r['run'].get('alpha'))}.</p>",
            "<h2>Keys</h2><ul>", *[f'<li class="mono">{_e(k)}</li>' for k in keys], "</ul>",
            f"<h2>Detected ({len(det)})</h2>", table(det) if det else "<p>none</p>",
            f"<h2>Every result ({len(rows)})</h2>", table(rows), "</body>", "</html>", ""]
    return "\n".join(page)


def load_sweep_keys(paths, folder: str | os.PathLike | None = None) -> list:
    """Keys from --key files and a --keys folder; each must hold a white-box mark."""
    from auditor.marks.keys import load_key

    files = [Path(k) for k in paths]
    if folder is not None:
        d = Path(folder)
        if not d.is_dir():
            raise AuditError(f"--keys {folder}: not a folder")
        found = sorted(f for f in d.glob("*.json") if f.is_file())
        if not found:
            raise AuditError(f"--keys {folder}: no *.json key file in it")
        files += found
    if not files:
        raise AuditError("no key given (--key K or --keys DIR)")
    keys = []
    for f in files:
        key = load_key(f)
        if not key.whitebox:
            raise AuditError(f"key {f} holds no white-box mark (a sweep audits white-box marks)")
        for mk in key.whitebox:
            if mk.projection.get("kind") == "npy":
                mk.matrix()  # read and check the sidecar here, so children need not find it
        keys.append(key)
    return keys
