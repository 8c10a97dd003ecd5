"""The command line in a fresh process without paying for its imports each time.

Most of a ``python -m pipeline.cli ...`` subprocess is spent importing torch, transformers and
sentence-transformers (about 3 s of 4 on this project's 2-core machine), and the suite runs
the command line a few hundred times. Here one helper process imports those libraries once
and forks a child per command. The child is a real, separate process: it gets the test's
environment, working directory, stdin, address-space limit and (for workers) a session of
its own, runs the command line's entry point exactly as ``python -m pipeline.cli`` does, and
exits with its exit code; its stdout and stderr are its own. What it does not repeat is the
interpreter's start and those third-party imports, so nothing of this project is imported
before the fork: every ``pipeline`` module (and whatever reads the environment when it is
imported) is imported by the child, under the child's environment.

A test that is about the interpreter's start itself (what gets imported, ``-W`` flags, the
installed ``moe-pipeline`` script) still runs ``subprocess`` directly.

    proc = forkrun.run([sys.executable, "-m", "pipeline.cli", "status"], env=env,
                       capture_output=True, text=True)        # as subprocess.run
    worker = forkrun.Popen([sys.executable, "-m", "pipeline.cli", "worker", "gpu"],
                           stdout=log.open("w"), stderr=subprocess.STDOUT,
                           start_new_session=True)            # as subprocess.Popen

Only ``python -m MODULE ...`` and ``python SCRIPT ...`` commands are forked; any other
command (another program, interpreter options such as ``-W``) goes to `subprocess` as given.

The helper refuses to start (and every call then falls back to a plain subprocess) if
importing the libraries printed anything: a child would then miss a line a user sees.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BASE_PATH: list[str] = []
# Third-party libraries only: never a module of this project, which must be imported under
# the child's own environment. Missing ones (an install without an extra) are skipped.
PRELOAD = ("numpy", "torch", "transformers", "sentence_transformers", "sqlalchemy", "celery",
           "kombu", "redis", "click", "pydantic", "pydantic_settings", "neo4j")


# Variables read when the interpreter starts or a preloaded library is imported: a command
# whose value differs from the helper's runs plainly (PYTHONPATH and PYTHONUNBUFFERED are
# honoured in the child, see `_child`).
STARTUP_PREFIXES = ("PYTHON", "LANG", "LC_", "HF_", "HUGGINGFACE", "TRANSFORMERS_", "TORCH",
                    "TRITON_", "OMP_", "MKL_", "CUDA_", "TOKENIZERS_", "SENTENCE_TRANSFORMERS",
                    "NUMEXPR_", "OPENBLAS_")
HONOURED = ("PYTHONPATH", "PYTHONUNBUFFERED")


def _startup_env(env) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(STARTUP_PREFIXES) and k not in HONOURED}


# -- the helper process ---------------------------------------------------------------------

def _serve() -> None:
    """Run as ``python forkrun.py``: preload, then answer one JSON request per stdin line."""
    import importlib

    global _BASE_PATH
    startup = _startup_env(os.environ)  # before the imports (some set variables of their own)
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "w", buffering=1)
    # The interpreter's own path (standard library, site-packages, .pth entries): a child
    # puts its script's folder and its own PYTHONPATH in front, as its interpreter would.
    ours = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    _BASE_PATH = [p for p in sys.path[1:] if os.path.abspath(p) not in ours]
    with tempfile.TemporaryFile() as noise:  # what the imports print, on either stream
        saved = [os.dup(1), os.dup(2)]
        os.dup2(noise.fileno(), 1)
        os.dup2(noise.fileno(), 2)
        for name in PRELOAD:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        noise.seek(0)
        printed = noise.read().decode(errors="replace")
    replies.write(json.dumps({"ready": not printed, "printed": printed[-2000:],
                              "env": startup}) + "\n")
    if printed:
        return
    children: dict[int, int | None] = {}
    for line in requests:
        req = json.loads(line)
        op = req["op"]
        if op == "spawn":
            pid = _fork(req)
            children[pid] = None
            replies.write(json.dumps({"pid": pid}) + "\n")
        elif op == "wait":  # timeout None: until it ends; 0: poll
            pid, timeout = req["pid"], req.get("timeout")
            replies.write(json.dumps({"code": _wait(children, pid, timeout)}) + "\n")
        elif op == "forget":
            children.pop(req["pid"], None)
            replies.write("{}\n")
    # The suite is done with it: leave without the interpreter's teardown of torch and the
    # rest (seconds, at the end of every run). Its children are processes of their own.
    replies.flush()
    os._exit(0)


def _wait(children: dict[int, int | None], pid: int, timeout: float | None) -> int | None:
    if children.get(pid) is not None:
        return children[pid]
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours, or reaped and forgotten
            return -1
        if got:
            children[pid] = os.waitstatus_to_exitcode(status)
            return children[pid]
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _fork(req: dict) -> int:
    """Fork a child and return its pid once it has its session, streams and directory (as
    `subprocess.Popen` returns after its child's exec): a test may signal its group at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        os.read(ready_r, 1)  # a byte when set up; nothing (EOF) if it died first
        os.close(ready_r)
        return pid
    os.close(ready_r)
    code = 1
    try:
        code = _child(req, ready_w)
    finally:
        os._exit(code)


def _child(req: dict, ready: int) -> int:
    import io
    import resource
    import runpy

    # A fresh interpreter holds only its standard streams.
    os.closerange(3, ready)
    os.closerange(ready + 1, 65536)
    if req.get("new_session"):
        os.setsid()
    # A fresh interpreter's signal handlers (it ignores SIGPIPE, as the helper still does).
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # What a fresh interpreter would have had on its standard streams.
    for fd, path, mode in ((0, req["stdin"], os.O_RDONLY),
                           (1, req["stdout"], os.O_WRONLY | os.O_APPEND),
                           (2, req["stderr"] or req["stdout"], os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    # Standard streams as a fresh interpreter makes them for files: stdout block-buffered
    # (unbuffered under the child's PYTHONUNBUFFERED), stderr line-buffered.
    unbuffered = bool(req["env"].get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, closefd=False)))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False) if unbuffered else
                                  io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False) if unbuffered else
                                  io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                  errors="backslashreplace", line_buffering=True,
                                  write_through=unbuffered)
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    if req.get("umask") is not None:
        os.umask(req["umask"])
    if req.get("limit"):
        resource.setrlimit(resource.RLIMIT_AS, (req["limit"], req["limit"]))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.write(ready, b".")
    os.close(ready)
    sys.argv = [req["script"] or "-m", *req["args"]]
    # `python SCRIPT` puts the script's folder first, `python -m` the working directory.
    first = os.path.dirname(os.path.abspath(req["script"])) if req["script"] else req["cwd"]
    extra = [os.path.abspath(p) for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *_BASE_PATH]
    try:
        if req["script"]:
            runpy.run_path(req["script"], run_name="__main__")
        else:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # a fresh interpreter ends by the signal itself
        sys.excepthook(*sys.exc_info())
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # The interpreter's shutdown: wait for non-daemon threads, then the atexit handlers.
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# -- the test side ---------------------------------------------------------------------------

class _Helper:
    """A helper started with ``startup`` as its start-up variables (`STARTUP_PREFIXES`). Its
    process starts at once; its first line (ready or not) is read on first use, so that a
    helper started early (`prestart`) imports its libraries while the tests are collected."""

    def __init__(self, startup: dict[str, str]) -> None:
        self.lock = threading.Lock()
        env = {**{k: v for k, v in os.environ.items() if k not in _startup_env(os.environ)},
               **startup}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, env=env)
        self._hello: dict | None = None

    def _greeted(self) -> dict:
        with self.lock:
            if self._hello is None:
                try:
                    self._hello = json.loads(self.proc.stdout.readline() or b'{"ready": false}')
                except ValueError:
                    self._hello = {"ready": False, "printed": "an unreadable first line"}
                if not self._hello.get("ready"):
                    print("forkrun: the helper is not used: "
                          f"{self._hello.get('printed', '')[-500:]}", file=sys.stderr)
        return self._hello

    @property
    def ready(self) -> bool:
        return bool(self._greeted().get("ready"))

    @property
    def env(self) -> dict[str, str]:
        return self._greeted().get("env", {})

    def ask(self, **req) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork helper died")
        return json.loads(line)

    def close(self) -> None:
        if self._hello is None:  # never used (started early for a run that forked nothing)
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


_helpers: dict[tuple[tuple[str, str], ...], _Helper] = {}
_helpers_lock = threading.Lock()
MAX_HELPERS = 3  # start-up environments beyond these run plainly


def _key(env) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(_startup_env(env).items()))


def _start(key: tuple[tuple[str, str], ...]) -> _Helper | None:
    """The helper of ``key``, started now unless `MAX_HELPERS` run (call with the lock held)."""
    if key not in _helpers and len(_helpers) >= MAX_HELPERS:
        return None
    helper = _helpers[key] = _Helper(dict(key))
    atexit.register(helper.close)
    return helper


def _forking() -> bool:
    return os.environ.get("MOE_TEST_FORK", "1").lower() not in ("0", "false", "no", "off")


def _get(env=None) -> _Helper | None:
    """The helper for ``env``'s start-up variables (default this process's), started on
    first use; None where forking is off or that helper could not start cleanly."""
    if not _forking():
        return None
    key = _key(os.environ if env is None else env)
    with _helpers_lock:
        helper = _helpers.get(key)
        if helper is None or (helper.ready and helper.proc.poll() is not None):
            helper = _start(key)  # one not ready is not tried again
        return helper if helper is not None and helper.ready else None


def prestart() -> None:
    """Start this process's helper now without waiting for it (a test module that runs
    commands calls this when it is imported, so the helper's imports overlap the rest of the
    collection on the other core); a no-op where forking is off or it already runs."""
    if _forking():
        with _helpers_lock:
            if _key(os.environ) not in _helpers:
                _start(_key(os.environ))


def retire(env) -> None:
    """Stop the helper of ``env``'s start-up variables, if one runs: a test that needed a helper
    of its own gives its place back (`MAX_HELPERS`)."""
    with _helpers_lock:
        helper = _helpers.pop(_key(env), None)
    if helper is not None:
        helper.close()


def _shaped(cmd: Sequence[str | os.PathLike]) -> bool:
    """``python -m MODULE ...`` or ``python SCRIPT ...``: a command a helper could fork."""
    return len(cmd) >= 2 and str(cmd[0]) == sys.executable and (
        str(cmd[1]) == "-m" and len(cmd) > 2 or not str(cmd[1]).startswith("-"))


def _helper_for(cmd: Sequence[str | os.PathLike], env) -> _Helper | None:
    """The helper that could fork ``cmd``; none, and none started (that takes seconds), for a
    command of another shape (``python -c``, another program)."""
    return _get(env) if _shaped(cmd) else None


def _forkable(cmd: Sequence[str | os.PathLike], env,
              helper: _Helper | None) -> tuple[str | None, str | None, list[str]] | None:
    """(module, script, arguments) of ``python -m MODULE ...`` or ``python SCRIPT ...``,
    when ``helper`` can fork it: ``env``'s variables read at start-up (`STARTUP_PREFIXES`:
    TRITON_INTERPRET, OMP_NUM_THREADS, PYTHONHASHSEED, HF_HOME...) must be the ones the
    helper started with (`_get` finds or starts the helper of each set, a few at most)."""
    if helper is None or not _shaped(cmd):
        return None
    if _startup_env(os.environ if env is None else env) != helper.env:
        return None
    first, rest = str(cmd[1]), [str(a) for a in cmd[2:]]
    return (rest[0], None, rest[1:]) if first == "-m" else (None, first, rest)


def _decode(raw: bytes, text: bool) -> str | bytes:
    """As subprocess reads a stream: strictly decoded in text mode, except that line ends
    are kept as written (subprocess's text mode would turn a stray \r into \n)."""
    return raw.decode() if text else raw


def _check_cwd(cwd) -> None:
    """As subprocess refuses a working directory that is not there, before any child."""
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(2, "No such file or directory", str(cwd))


def _target(spec, tmp: Path, name: str) -> str | None:
    """Where a child's stream goes: a path (PIPE: a file of ours), or None (STDOUT)."""
    if spec == subprocess.PIPE:
        path = tmp / name
        path.touch()
        return str(path)
    if spec == subprocess.DEVNULL:
        return os.devnull
    if spec == subprocess.STDOUT:
        return None
    return str(Path(spec.name).resolve())  # an open file


class _Child:
    """A child of the helper: as much of `subprocess.Popen` as the tests use."""

    def __init__(self, helper: _Helper, cmd, module: str | None, script: str | None,
                 args: list[str], *, env, cwd, streams: dict[str, str | None], text: bool,
                 new_session: bool = False, limit: int | None = None,
                 umask: int | None = None) -> None:
        self.helper, self.args, self.text = helper, list(cmd), text
        self.returncode: int | None = None
        self.pid = helper.ask(op="spawn", module=module, script=script, args=args,
                              env=dict(os.environ if env is None else env),
                              cwd=str(cwd or os.getcwd()), **streams,
                              new_session=new_session, limit=limit, umask=umask)["pid"]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.helper.ask(op="wait", pid=self.pid, timeout=0)["code"]
            self._done()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        # Short waits, so that the helper serves other calls (another thread's) meanwhile.
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            self.returncode = self.helper.ask(op="wait", pid=self.pid, timeout=0.05)["code"]
            if self.returncode is None and deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self._done()
        return self.returncode

    def _done(self) -> None:
        if self.returncode is not None:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self.helper.ask(op="forget", pid=self.pid)

    def send_signal(self, sig: int) -> None:
        try:
            alive = self.poll() is None
        except (RuntimeError, OSError, ValueError):  # the helper is gone: signal it anyway
            alive = True
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Popen(_Child):
    """`subprocess.Popen` for the commands `_forkable` accepts, with the streams the tests
    give (an open file, PIPE, DEVNULL, STDOUT); anything else goes to `subprocess.Popen`."""

    def __new__(cls, cmd, **kwargs):
        if (_forkable(cmd, kwargs.get("env"), _helper_for(cmd, kwargs.get("env"))) is None
                or set(kwargs) - {"env", "cwd", "stdout", "stderr", "stdin",
                                  "start_new_session", "text"}
                or kwargs.get("stdout") is None or kwargs.get("stderr") is None
                or kwargs.get("stdin") not in (None, subprocess.DEVNULL)):
            return subprocess.Popen(cmd, **kwargs)
        return super().__new__(cls)

    def __init__(self, cmd, *, env=None, cwd=None, stdout=None, stderr=None, stdin=None,
                 start_new_session: bool = False, text: bool = False) -> None:
        helper = _helper_for(cmd, env)
        module, script, args = _forkable(cmd, env, helper)
        _check_cwd(cwd)
        self._tmp = tempfile.TemporaryDirectory(prefix="forkrun-")
        tmp = Path(self._tmp.name)
        streams = {"stdin": os.devnull, "stdout": _target(stdout, tmp, "stdout"),
                   "stderr": _target(stderr, tmp, "stderr")}
        # What communicate() returns: the streams given as PIPE, read from our files.
        self._out = streams["stdout"] if stdout == subprocess.PIPE else None
        self._err = streams["stderr"] if stderr == subprocess.PIPE else None
        super().__init__(helper, cmd, module, script, args, env=env, cwd=cwd, streams=streams,
                         text=text, new_session=start_new_session)

    def _read(self, path: str | None):
        return None if path is None else _decode(Path(path).read_bytes(), self.text)

    def communicate(self, input=None, timeout: float | None = None):
        self.wait(timeout)
        return self._read(self._out), self._read(self._err)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.wait()


def run(cmd, *, capture_output: bool = False, text: bool = False, env=None, cwd=None,
        timeout: float | None = None, input=None, check: bool = False, limit: int | None = None,
        umask: int | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` for the commands `_forkable` accepts (the rest go to subprocess), plus
    ``limit``, an address-space limit (bytes), and ``umask`` for the child."""
    helper = _helper_for(cmd, env)
    forkable = _forkable(cmd, env, helper)
    if forkable is None or kwargs:
        def before() -> None:
            if limit:
                import resource
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            if umask is not None:
                os.umask(umask)

        return subprocess.run(cmd, capture_output=capture_output, text=text, env=env,
                              cwd=cwd, timeout=timeout, input=input, check=check,
                              preexec_fn=before if limit or umask is not None else None,
                              **kwargs)
    _check_cwd(cwd)
    with tempfile.TemporaryDirectory(prefix="forkrun-") as tmp:
        paths = {name: Path(tmp) / name for name in ("stdin", "stdout", "stderr")}
        data = input if isinstance(input, bytes) or input is None else input.encode()
        paths["stdin"].write_bytes(data or b"")
        for name in ("stdout", "stderr"):
            paths[name].touch()
        streams: dict[str, str | None] = {k: str(p) for k, p in paths.items()}
        if not capture_output:  # the test's own streams (pytest captures them to files)
            streams["stdout"] = f"/proc/{os.getpid()}/fd/1"
            streams["stderr"] = f"/proc/{os.getpid()}/fd/2"
        assert helper is not None  # forkable: there is a helper
        child = _Child(helper, cmd, *forkable, env=env, cwd=cwd, streams=streams, text=text,
                       limit=limit, umask=umask)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise

        out, err = ((_decode(paths[n].read_bytes(), text) for n in ("stdout", "stderr"))
                    if capture_output else (None, None))
        done = subprocess.CompletedProcess(list(cmd), code, out, err)
    if check:
        done.check_returncode()
    return done


if __name__ == "__main__":
    _serve()
else:  # imported by a test module: that module runs commands
    prestart()
