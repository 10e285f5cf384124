"""Hostile snippets are stopped by the OS sandbox, judged by what happened on the host.

Each escape seen against the old audit-hook sandbox (issue 9) is tried again; the assertions look
at the host (canary files, a live process, a listening socket, our secrets), not at what the
snippet reports. The fork bomb is linear (only the parent forks; children sleep), so even if every
layer failed it could not grow exponentially, and killing bwrap kills its whole pid namespace.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tracemalloc
import uuid

import pytest

from edentune.config import RunConfig
from edentune.errors import EdentuneError
from edentune.evaluate import sandbox
from edentune.evaluate.backends import Generation
from edentune.evaluate.runner import case_metrics, check_answer
from edentune.evaluate.sandbox import NOT_RUN_NO_SANDBOX, Limits, run_python
from edentune.evaluate.suite import Case

FAST = Limits(cpu_seconds=2, wall_seconds=4, memory_bytes=512 << 20)
SECRET = "EDENTUNE_TEST_SECRET=s3cr3t-value-for-the-sandbox-test"

needs_sandbox = pytest.mark.skipif(sandbox.find_sandbox() is None, reason="no working sandbox on this machine "
                                   "(bwrap refused): covered by the no-isolation tests below")


def _host_text(r: sandbox.RunResult) -> str:
    return r.stdout + r.error


@pytest.fixture
def host_process():
    """A host process carrying the secret in its environment (visible in its /proc/PID/environ)."""
    name, value = SECRET.split("=", 1)
    proc = subprocess.Popen(["sleep", "60"], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), name: value})
    yield proc
    proc.kill()
    proc.wait()


# -- ordinary programs --------------------------------------------------------------------------
@needs_sandbox
def test_ordinary_program_passes_and_can_write_its_own_dir_and_tmp():
    r = run_python("open('out.txt', 'w').write('ok')\nopen('/tmp/t', 'w').write('!')\n"
                   "print(open('out.txt').read() + open('/tmp/t').read())", FAST)
    assert (r.status, r.stdout) == ("pass", "ok!\n")


@needs_sandbox
def test_failing_program_fails_with_its_own_error_capped():
    r = run_python("raise ValueError('boom')", FAST)
    assert r.status == "fail" and r.error == "ValueError: boom"
    r = run_python("raise ValueError('x' * 100000)", FAST)
    assert r.status == "fail" and len(r.error) <= sandbox.ERROR_CHARS
    assert run_python("import sys; sys.exit(3)", FAST).status == "fail"


# -- escapes seen against the audit hook ----------------------------------------------------------
@needs_sandbox
def test_dir_fd_writes_and_deletes_do_not_reach_the_host(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    created, made = tmp_path / "created.txt", tmp_path / "made"
    code = f"""
import os
root = os.open('/', 0)
for attempt in (lambda: os.remove({str(victim)[1:]!r}, dir_fd=root),
                lambda: open({str(created)[1:]!r}, 'w', opener=lambda p, f: os.open(p, f, dir_fd=root)).write('pwned'),
                lambda: os.mkdir({str(made)[1:]!r}, dir_fd=root),
                lambda: open({str(victim)!r}, 'w').write('pwned')):
    try:
        attempt()
    except OSError:
        pass
os._exit(0)  # a harmless program exiting 0 is a pass; what matters is that nothing above escaped
"""
    run_python(code, FAST)
    assert victim.read_text() == "keep"
    assert not created.exists() and not made.exists()


@needs_sandbox
def test_other_processes_cannot_be_signalled(host_process):
    code = f"""
import os, signal
for attempt in (lambda: signal.pidfd_send_signal(os.pidfd_open({host_process.pid}), signal.SIGTERM),
                lambda: os.kill({host_process.pid}, signal.SIGKILL),
                lambda: os.kill(-1, signal.SIGKILL)):
    try:
        attempt()
    except OSError as err:
        print(err)
"""
    r = run_python(code, FAST)
    assert host_process.poll() is None  # still alive
    assert "No such process" in r.stdout  # its pid does not exist in the sandbox's pid namespace


@needs_sandbox
def test_host_secrets_and_files_never_reach_results(host_process, monkeypatch, tmp_path):
    name, value = SECRET.split("=", 1)
    monkeypatch.setenv(name, value)
    with open(f"/proc/{host_process.pid}/environ", "rb") as f:
        assert value.encode() in f.read()  # the secret is really there on the host
    code = f"""
import glob, os
seen = [repr(dict(os.environ))]
for path in ['/etc/shadow', '/etc/passwd', '/proc/{os.getpid()}/environ', '/proc/{host_process.pid}/environ',
             '/proc/{os.getppid()}/environ', *glob.glob('/proc/*/environ'), *glob.glob('/proc/*/cmdline')]:
    try:
        seen.append(path + ': ' + open(path, 'rb').read().decode(errors='replace'))
    except OSError as err:
        seen.append(repr(err))
print(seen)
print(open('/etc/passwd').read())
raise RuntimeError(' '.join(seen))  # the error text goes into the results too
"""
    r = run_python(code, FAST)
    uid, gid = sandbox.find_sandbox().run_as or (os.getuid(), os.getgid())
    assert r.status == "fail" and r.stdout.endswith(f"\nsandbox:x:{uid}:{gid}::/sandbox:/bin/false\n\n")  # synthetic
    text = _host_text(r)
    assert value not in text and "root:x:0:0" not in text
    if os.access("/etc/shadow", os.R_OK):
        shadow = open("/etc/shadow").read().splitlines()[0]
        assert shadow not in text
    # Nor in the results file an evaluation writes.
    cfg = RunConfig()
    result = check_answer(Case(id="leak", prompt="q", expected_language="en"), Generation(f"```python\n{code}\n```", 0.1), cfg, FAST)
    assert value not in json.dumps(result.model_dump())


@needs_sandbox
def test_host_files_are_not_visible(tmp_path):
    (tmp_path / "notes.txt").write_text("private")
    r = run_python(f"import os\nprint(os.path.exists({str(tmp_path)!r}), os.path.exists({__file__!r}), "
                   f"sorted(os.listdir('/etc')))", FAST)
    assert (r.status, r.stdout) == ("pass", "False False ['ld.so.cache', 'passwd']\n")
    if sys.prefix != sys.base_prefix:  # of a venv, only the venv is visible, not the folder holding it
        r = run_python("import os, sys\nprint(os.listdir(os.path.dirname(sys.prefix)))", FAST)
        assert r.stdout == f"{[os.path.basename(sys.prefix)]}\n"


@needs_sandbox
def test_system_dirs_stay_read_only_and_no_nested_namespaces():
    canary = f"/usr/edentune-canary-{uuid.uuid4().hex}"
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
print(libc.mount(None, b'/usr', None, MS_REMOUNT | MS_BIND, None), os.strerror(ctypes.get_errno()))  # rw again?
print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))  # CLONE_NEWUSER: root in a nested namespace?
try:
    open({canary!r}, 'w').write('pwned')
except OSError as err:
    print(err)
"""
    r = run_python(code, FAST)
    assert not os.path.exists(canary)
    assert r.stdout.splitlines()[:2] == ["-1 Operation not permitted", "-1 No space left on device"]


@needs_sandbox
def test_no_network_even_to_localhost():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')", FAST)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert r.status == "fail" and "Connection refused" in r.error


# -- as root (CI runs as root): the sandbox is never host uid 0 -------------------------------------
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="checks what root's sandbox may do; an ordinary user's "
                             "sandbox is that user, covered by the tests above")


@as_root
def test_as_root_a_sandbox_is_found_and_runs_as_nobody():
    box = sandbox.find_sandbox()
    assert box is not None, sandbox.why_no_sandbox()  # as root the sandbox must work, else code is not run
    assert box.run_as is not None and 0 not in box.run_as


def test_sysctls_cannot_be_written():
    """kernel.core_pattern piped to a program runs it as host root: the sandbox must not open it
    for writing. The snippet writes back what the host already has, so a failure changes nothing."""
    host = {}
    for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches"):
        try:
            host[path] = open(path).read()
        except OSError:  # drop_caches is write-only, even for root
            host[path] = "0"  # not a valid value: the kernel refuses it, nothing is dropped
    code = f"""
import os
for path, value in {host!r}.items():
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as err:
        print(path, 'refused', err.strerror)
        continue
    try:
        os.write(fd, value.encode())
    except OSError:
        pass
    print(path, 'OPENED FOR WRITING')
"""
    r = run_python(code, FAST)
    if sandbox.find_sandbox() is None:
        assert os.geteuid() != 0, sandbox.why_no_sandbox()  # as root the sandbox must work
        assert r.status == "not_run"
        return
    assert r.status == "pass", r.error
    assert "OPENED" not in r.stdout and r.stdout.count(" refused ") == 2, r.stdout
    assert open("/proc/sys/kernel/core_pattern").read() == host["/proc/sys/kernel/core_pattern"]


@needs_sandbox
def test_sandboxed_process_is_not_host_root():
    """Judged from the host: the sandbox's processes have no host uid 0 and their user namespace
    maps no id to host 0 (read from inside, uid_map is relative to bwrap's own first namespace)."""
    import threading

    marker = _marker()
    result = {}
    runner = threading.Thread(target=lambda: result.update(r=run_python(
        f"import os\nprint(os.getuid(), flush=True)\nos.execv('/bin/sleep', ['sleep', '{marker}'])", Limits(wall_seconds=5))))
    runner.start()
    seen = []
    try:
        for _ in range(100):
            seen = _host_processes_with(marker)
            if seen:
                break
            threading.Event().wait(0.05)
        assert seen, "the sandboxed sleep never appeared"
        for pid in seen:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
            uids = {int(u) for u in status["Uid"].split()}
            maps = [line.split() for line in open(f"/proc/{pid}/uid_map").read().splitlines()]
            assert 0 not in uids and all(int(outside) != 0 for _, outside, _ in maps), (status["Uid"], maps)
            if os.geteuid() == 0:
                assert uids == {sandbox.find_sandbox().run_as[0]}
    finally:
        runner.join()
    assert result["r"].status == "timeout"


# -- resource floods ----------------------------------------------------------------------------
def _host_processes_with(marker: str) -> list[str]:
    """Host processes whose command line holds `marker` (sandboxed children exec `sleep MARKER`)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def _marker() -> str:
    return f"{600 + uuid.uuid4().int % 10 ** 6 / 10 ** 7:.7f}"  # a unique sleep duration


@needs_sandbox
def test_fork_bomb_is_stopped_and_leaves_nothing_behind():
    marker = _marker()
    bomb = f"import os\nwhile True:\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    r = run_python(bomb, FAST)
    assert r.status == "fail" and "Resource temporarily unavailable" in r.error
    assert _host_processes_with(marker) == []  # the sleeping children died with the sandbox


@needs_sandbox
def test_thread_bomb_is_stopped():
    r = run_python("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()",
                   FAST)
    assert r.status == "fail" and "can't start new thread" in r.error and r.seconds < FAST.wall_seconds


@needs_sandbox
@pytest.mark.parametrize("code", ["x = bytearray(10 * 1024 ** 3)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))"])
def test_memory_hog_is_stopped(code):
    r = run_python(code, Limits(memory_bytes=256 << 20, cpu_seconds=10, wall_seconds=20))
    assert r.status == "blocked" and "MemoryError" in r.error


@needs_sandbox
def test_disk_is_bounded():
    r = run_python("for i in range(100):\n    open(f'f{i}', 'wb').write(bytes(4 << 20))", Limits(disk_bytes=16 << 20))
    assert r.status == "blocked" and "No space left" in r.error
    # bwrap's own root and /dev are tmpfs without a size: read-only, so they cannot be filled instead
    r = run_python("import os\nfor p in ('/x', '/etc/x', '/dev/x', '/tmp/x'):\n    try:\n        open(p, 'w').close()\n"
                   "        print(p, 'written')\n    except OSError as err:\n        print(p, err.strerror)", FAST)
    assert r.stdout.splitlines() == ["/x Read-only file system", "/etc/x Read-only file system", "/dev/x Read-only file system",
                                     "/tmp/x written"]


@needs_sandbox
def test_cpu_spin_hits_cpu_limit():
    r = run_python("while True: pass", Limits(cpu_seconds=1, wall_seconds=20))
    assert r.status == "timeout" and "CPU" in r.error  # not the wall clock


@needs_sandbox
def test_sleep_past_wall_time_is_killed_with_its_children():
    marker = _marker()
    code = f"import os\nif os.fork() == 0:\n    os.setsid()\nos.execv('/bin/sleep', ['sleep', '{marker}'])"
    r = run_python(code, Limits(wall_seconds=1))
    assert r.status == "timeout" and "wall-clock" in r.error and r.seconds < 3
    assert _host_processes_with(marker) == []


@needs_sandbox
def test_closing_its_output_does_not_escape_the_wall_clock():
    r = run_python("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(10 ** 6)", Limits(wall_seconds=1))
    assert r.status == "timeout" and r.seconds < 3


@needs_sandbox
def test_gigabyte_of_stdout_is_cut_off_in_bounded_memory():
    tracemalloc.start()
    try:
        r = run_python("import sys\nfor _ in range(1024):\n    sys.stdout.buffer.write(b'x' * (1 << 20))", Limits(wall_seconds=20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status == "blocked" and "output limit" in r.error
    assert len(r.stdout) <= sandbox.STDOUT_CHARS  # and it ended at 8 MiB, well before the wall clock
    assert peak < 4 * Limits().output_keep + (1 << 20)


# -- where no isolation is available ------------------------------------------------------------
@pytest.fixture
def no_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "find_sandbox", lambda: None)


@pytest.fixture
def ordinary_user(monkeypatch):
    """The unsandboxed opt-in as a user would run it (as root it never runs; CI is root)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def test_without_sandbox_code_is_not_run(no_sandbox, tmp_path, monkeypatch):
    canary = tmp_path / "ran.txt"
    code = f"open({str(canary)!r}, 'w').write('ran')"
    r = run_python(code, FAST)
    assert (r.status, r.error) == ("not_run", NOT_RUN_NO_SANDBOX) and not canary.exists()
    assert run_python(code, FAST, mode="never").status == "not_run" and not canary.exists()
    with pytest.raises(EdentuneError, match="no sandbox"):
        run_python(code, FAST, mode="sandbox")
    # As root even the explicit opt-in runs nothing.
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    r = run_python(code, FAST, mode="unsafe-no-sandbox")
    assert (r.status, r.error) == ("not_run", sandbox.NOT_RUN_AS_ROOT) and not canary.exists()
    # For a user, the explicit opt-in runs it, with limits and a clean environment but no isolation.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_python(code, FAST, mode="unsafe-no-sandbox").status == "pass" and canary.read_text() == "ran"


def test_unsandboxed_opt_in_still_has_limits_and_no_secrets(no_sandbox, ordinary_user, monkeypatch):
    name, value = SECRET.split("=", 1)
    monkeypatch.setenv(name, value)
    assert value not in run_python("import os; print(os.environ)", FAST, mode="unsafe-no-sandbox").stdout
    r = run_python("import time\ntime.sleep(10 ** 6)", Limits(wall_seconds=1), mode="unsafe-no-sandbox")
    assert r.status == "timeout"


def test_without_sandbox_the_code_metric_is_not_applicable(no_sandbox):
    cfg = RunConfig()
    case = Case(id="code", prompt="write code", expected_behavior="provides_running_code")
    result = check_answer(case, Generation("```python\nprint(1)\n```", 0.1), cfg, FAST)
    assert (result.code_status, result.code_error) == ("not_run", NOT_RUN_NO_SANDBOX)
    assert result.behavior_ok is None and result.passed
    no_code = check_answer(case, Generation("no code here", 0.1), cfg, FAST)
    assert case_metrics([result, no_code])["code_pass_rate"] is None  # not 0, not 1


def test_sandbox_mode_fails_before_generating(no_sandbox):
    from edentune.evaluate.runner import evaluate
    from edentune.evaluate.suite import Suite

    class Unused:
        name = "unused"

        def generate(self, *_):
            raise AssertionError("generated although the run could never be scored")

    cfg = RunConfig()
    cfg.evaluation.run_code = "sandbox"
    with pytest.raises(EdentuneError, match="no sandbox"):
        evaluate(cfg, Unused(), Suite(name="x", path="x", cases=[Case(id="a", prompt="q", expected_language="en")]))


def test_code_metric_is_over_the_cases_that_ask_for_code_for_every_model():
    """A model that answers a code case without code fails it (the rate is measured, 0), and code in
    an answer to a case that did not ask for it does not make a rate: base and fine-tuned models are
    compared over the same cases, so the gate sees two measurements, not one side only."""
    from edentune.evaluate.compare import compare
    from edentune.evaluate.runner import EvalResult

    cfg = RunConfig()
    cfg.evaluation.gate_test = "tolerance"  # one case each: what is checked is that both sides are measured, not significance
    asks = Case(id="asks", prompt="write code", expected_behavior="provides_running_code")
    chat = Case(id="chat", prompt="hello", expected_language="en")
    base = [check_answer(asks, Generation("I cannot write code.", 0.1), cfg, FAST),
            check_answer(chat, Generation("Hello!", 0.1), cfg, FAST)]
    tuned = [check_answer(asks, Generation("```python\nprint(1)\n```", 0.1), cfg, FAST),
             check_answer(chat, Generation("Hi!\n```python\nprint(2)\n```", 0.1), cfg, FAST)]
    assert tuned[1].code_status == "pass"  # incidental code still runs and shows in its case
    assert case_metrics(base)["code_pass_rate"] == 0.0 and case_metrics(tuned)["code_pass_rate"] == 1.0
    assert case_metrics([base[1], tuned[1]])["code_pass_rate"] is None  # no case asks for code: n/a

    def result(cases):
        return EvalResult(model="m", suite="s", suite_sha256="x" * 64, settings={}, created="now", cases=cases,
                          metrics=case_metrics(cases), by_category={}, by_language={})

    verdict = {m.key: m.verdict for m in compare(result(base), result(tuned), cfg).metrics}
    assert verdict["code_pass_rate"] == "better"
    # the quickstart's case: no case asks for code, the fine-tuned model adds some: n/a, not invalid
    verdict = {m.key: m.verdict for m in compare(result(base[1:]), result(tuned[1:]), cfg).metrics}
    assert verdict["code_pass_rate"] == "n/a"
