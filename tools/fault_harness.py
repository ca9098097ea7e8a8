"""The machinery of ``tools/faults.py``: the processes it starts (and ends), the jobs of
``tools/fault_job.py``, how a command's outcome is judged (wrong data, unclear error, survived), the
loads run in bulk after a family's trials, the base checkpoints trials corrupt copies of, tmpfs mounts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

REPO = benchlib.ROOT
TOOLS = Path(__file__).resolve().parent
JOB = TOOLS / "fault_job.py"
UCP = [str(Path(sys.executable).parent / "ucp")] if (Path(sys.executable).parent / "ucp").exists() \
    else [sys.executable, "-m", "ucp.cli.main"]
log = benchlib.logger("faults")

TRACE_MARKS = ("Traceback (most recent call last)", "terminate called", "Exception raised from", "Fatal Python error",
               "core dumped")
MEMORY_LIMIT_MB = 1024  # a command reading a small hostile file must stay below this peak RSS


class HarnessError(Exception):
    """The harness itself could not set a trial up (not a finding about ucp)."""


# -- processes --------------------------------------------------------------------------------------

@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float
    maxrss_mb: float = 0.0
    timed_out: bool = False
    cmd: str = ""


class Processes:
    """Every process the harness starts (each in a session of its own), so all can be ended."""

    def __init__(self):
        self.live: list[subprocess.Popen] = []

    def start(self, cmd, *, stdout, stderr, env=None, cwd=None) -> subprocess.Popen:
        p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             env=env, cwd=cwd, start_new_session=True)
        self.live.append(p)
        return p

    def end(self, p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.returncode is None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                log(f"process {p.pid} did not die")
        if p in self.live and p.returncode is not None:
            self.live.remove(p)

    def end_all(self) -> None:
        for p in list(self.live):
            self.end(p)

    def run(self, cmd, timeout: float = 60, env=None, cwd=None) -> Result:
        """Run ``cmd`` to its end (killed after ``timeout`` s); its status, output and peak memory."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            p = self.start(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
            timed_out, status, ru = False, 0, None
            while True:
                pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    _, status, ru = os.wait4(p.pid, 0)
                    break
                time.sleep(0.01)
            p.returncode = os.waitstatus_to_exitcode(status)
            self.live.remove(p)
            try:  # the rest of its session (a command that started children)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            out.seek(0)
            err.seek(0)
            return Result(p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                          time.monotonic() - t0, ru.ru_maxrss / 1024 if ru else 0.0, timed_out,
                          " ".join(map(str, cmd)))


def events_of(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Job:
    """One launch of ``fault_job.py run`` on ``nproc`` ranks (a gloo world on 127.0.0.1)."""

    def __init__(self, ctx: "Context", root: Path, actions: list[str], nproc: int = 1, keep=None, seed: int = 0,
                 size: int = 16, env_of_rank=None, name: str = "job"):
        self.ctx = ctx
        self.dir = Path(tempfile.mkdtemp(prefix=name + "-", dir=ctx.work))
        port = benchlib.free_port()
        self.procs, self.outs, self.errs = [], [], []
        for r in range(nproc):
            env = dict(ctx.env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
            if env_of_rank:
                env.update(env_of_rank(r))
            cmd = [sys.executable, JOB, "run", root, "--actions", ",".join(actions), "--seed", seed, "--size", size]
            if keep is not None:
                cmd += ["--keep", keep]
            out, err = self.dir / f"out{r}", self.dir / f"err{r}"
            self.outs.append(out)
            self.errs.append(err)
            with open(out, "wb") as o, open(err, "wb") as e:
                self.procs.append(ctx.procs.start(cmd, stdout=o, stderr=e, env=env))

    def events(self) -> list[dict]:
        try:
            return events_of(self.outs[0].read_text(errors="replace"))
        except OSError:
            return []

    def stderr(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.errs if p.exists())

    def wait(self, timeout: float = 120) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return self.end()

    def end(self) -> list[int | None]:
        codes = [p.poll() for p in self.procs]
        for p in self.procs:
            self.ctx.procs.end(p)
        return codes


# -- judging ----------------------------------------------------------------------------------------

Finding = tuple  # ("wrong" | "unclear", description)


def short(text: str, n: int = 140) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def message_findings(what: str, err: str, rc, names=(), timed_out=False) -> list[Finding]:
    """What is unclear about a failed command's stderr ``err`` (exit status ``rc``); ``names``: the
    paths (or words) the message should name, any one of them."""
    if timed_out:
        return [("unclear", f"{what}: timed out")]
    found = []
    if rc is not None and (rc < 0 or rc >= 128):
        found.append(("unclear", f"{what}: exit by signal (rc {rc})"))
    traced = [m for m in TRACE_MARKS if m in err]
    # `ucp verify` reports each bad file on a line of its own ("BAD <path>: why") before its one error line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("BAD ")]
    if traced:
        last = lines[-1] if lines else ""
        found.append(("unclear", f"{what}: {traced[0]!r} on stderr: {short(last, 100)}"))
    elif rc not in (0, None):
        if not lines:
            found.append(("unclear", f"{what}: exit {rc} without a message"))
        elif len(lines) > 1:
            found.append(("unclear", f"{what}: {len(lines)}-line message: {short(lines[0], 60)} | {short(lines[1], 60)}"))
        elif names and not any(str(n) in err for n in names if n):
            found.append(("unclear", f"{what}: names none of {[str(n) for n in names][:2]}: {short(lines[0])}"))
    return found


def cli_findings(what: str, r: Result, names=()) -> list[Finding]:
    return message_findings(what, r.err, r.rc, names, r.timed_out)


def event_findings(what: str, ev: dict, names=()) -> list[Finding]:
    """A failed job or load event: the error must be a UcpError of one line naming ``names``."""
    if ev.get("ok", True):
        return []
    if ev.get("kind") != "ucp":
        return [("unclear", f"{what}: raised {ev.get('cls')}, not a UcpError: {short(ev.get('error', ''), 90)}")]
    if ev.get("lines", 1) > 1:
        return [("unclear", f"{what}: {ev['lines']}-line message: {short(ev.get('error', ''), 90)}")]
    if names and not any(str(n) in ev.get("error", "") for n in names if n):
        return [("unclear", f"{what}: names none of {[str(n) for n in names][:2]}: {short(ev.get('error', ''))}")]
    return []


@dataclass
class LoadCheck:
    """A load the harness runs after the trials of a family (one process loads many: see fault_job.py)."""

    trial: int
    path: str  # ROOT, ROOT@STEP or a universal directory
    what: str
    digests: dict  # step -> set of the digests a load of that step may return
    step: int | None = None  # the step the load must return (None: any step of ``digests``)
    must_load: bool = False  # a healthy checkpoint: a refusal is a finding
    names: tuple = ()
    size: int = 16  # the hidden width of fault_job.py's model the checkpoint was saved from


def judge_load(c: LoadCheck, ev: dict | None) -> list[Finding]:
    if ev is None:
        return [("unclear", f"{c.what}: the load process died (signal or abort) loading {c.path}")]
    if ev.get("ok"):
        if ev.get("step") is None:
            if c.must_load or c.step is not None:
                return [("wrong", f"{c.what}: load() found no checkpoint")]
            return []
        if c.step is not None and ev["step"] != c.step:
            return [("wrong", f"{c.what}: load() resumed step {ev['step']}, expected {c.step}")]
        if ev.get("digest") not in c.digests.get(ev["step"], ()):
            return [("wrong", f"{c.what}: load() returned step {ev['step']} with tensors not bit-identical to those "
                              "saved")]
        return []
    found = event_findings(c.what + ": load", ev, c.names)
    if c.must_load and not found:
        found = [("unclear", f"{c.what}: load refused a healthy checkpoint: {short(ev.get('error', ''), 100)}")]
    return found


@dataclass
class Tally:
    trials: int = 0
    survived: int = 0
    wrong_data: int = 0
    unclear_errors: int = 0
    harness_errors: int = 0
    examples: list = field(default_factory=list)

    def add(self, findings: list[Finding], harness_error: str | None = None) -> None:
        self.trials += 1
        if harness_error:
            self.harness_errors += 1
            self.note(f"harness: {harness_error}")
            return
        kinds = {k for k, _ in findings}
        self.wrong_data += "wrong" in kinds
        self.unclear_errors += "unclear" in kinds
        self.survived += not kinds
        for kind, what in findings[:1]:
            self.note(f"{'wrong data' if kind == 'wrong' else 'unclear'}: {what}")

    def note(self, text: str) -> None:
        if len(self.examples) < 3:
            self.examples.append(short(text, 240))

    def doc(self) -> dict:
        return {"trials": self.trials, "survived": self.survived, "wrong_data": self.wrong_data,
                "unclear_errors": self.unclear_errors, "harness_errors": self.harness_errors,
                "examples": self.examples}


# -- the run's context and its base checkpoints -----------------------------------------------------

class Context:
    def __init__(self, work: Path, timeout: float):
        self.work = work
        self.timeout = timeout
        self.procs = Processes()
        self.mounts: list[Path] = []
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.env.pop("TORCHELASTIC_RUN_ID", None)
        self._base = None

    def ucp(self, *args, timeout: float | None = None, cwd=None) -> Result:
        return self.procs.run([*UCP, *args], timeout=timeout or self.timeout, env=self.env, cwd=cwd)

    def python(self, *args, timeout: float | None = None) -> Result:
        return self.procs.run([sys.executable, *args], timeout=timeout or self.timeout, env=self.env)

    def base(self) -> dict:
        """Made once: a 2-rank checkpoint root (steps 1 and 2), its digests, and its universal
        conversion; trials corrupt copies of them."""
        if self._base is None:
            d = self.work / "base"
            d.mkdir()
            job = Job(self, d / "root", ["save:1", "save:2"], nproc=2, name="base")
            codes = job.wait(self.timeout * 2)
            evs = [e for e in job.events() if e.get("ok") and "step" in e]
            if codes != [0, 0] or len(evs) != 2:
                raise HarnessError(f"the base checkpoint could not be saved (exit {codes}): "
                                   f"{short(job.stderr()[-400:], 300)}")
            r = self.ucp("convert", d / "root", d / "uni", "--quiet")
            if r.rc != 0:
                raise HarnessError(f"the base checkpoint could not be converted: {short(r.err, 300)}")
            self._base = {"root": d / "root", "uni": d / "uni", "digests": {e["step"]: {e["digest"]} for e in evs}}
        return self._base

    def load_all(self, checks: list[LoadCheck]) -> list[dict | None]:
        """Run the loads of ``checks`` in as few processes as possible (one per model size; a process
        that dies is restarted after the load it died in); their events, None for a load a process
        died in."""
        events: dict[int, dict | None] = {}
        for size in sorted({c.size for c in checks}):
            mine = [k for k, c in enumerate(checks) if c.size == size]
            for k, ev in zip(mine, self._load_all([checks[k] for k in mine], size)):
                events[k] = ev
        return [events[k] for k in range(len(checks))]

    def _load_all(self, checks: list[LoadCheck], size: int) -> list[dict | None]:
        out: list[dict | None] = []
        while len(out) < len(checks):
            rest = checks[len(out):]
            r = self.procs.run([sys.executable, JOB, "load", "--size", size, *[c.path for c in rest]],
                               timeout=self.timeout + 5 * len(rest), env=self.env)
            evs = events_of(r.out)
            out += evs[:len(rest)]
            if len(out) < len(checks):
                if evs or r.rc not in (0, None):
                    out.append(None)  # the one it died in
                    if r.err.strip():
                        log(f"the load process died on {checks[len(out) - 1].path}: {short(r.err[-300:], 300)}")
                else:
                    raise HarnessError(f"the load process reported nothing: {short(r.err[-300:], 300)}")
        return out

    def mount_tmpfs(self, path: Path, mb: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise HarnessError(f"cannot mount a {mb} MB tmpfs on {path} (needs root): {short(r.stderr)}")
        self.mounts.append(path)

    def unmount(self, path: Path) -> None:
        if path in self.mounts:
            r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"unmounting {path} failed: {short(r.stderr)}")
            self.mounts.remove(path)

    def cleanup(self) -> None:
        self.procs.end_all()
        for m in list(self.mounts):
            self.unmount(m)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def step_name(step: int) -> str:
    return f"step_{step:08d}"


