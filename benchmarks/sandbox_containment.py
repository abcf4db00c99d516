"""Containment of hostile programs by the ``code`` reward's sandbox, measured.

Each program below is scored by ``CodeReward`` (a 1-case standard-input test expecting ``ok``). After each run
this script checks, independently of the sandbox's own clean-up code:

* the wall time of the reward call;
* live processes left behind (running as the run's sandbox uid or carrying the sandbox marker);
* whether the file the program tried to create outside its directory exists;
* whether a listener this script opened on 127.0.0.1 (and nowhere else) accepted a connection;
* whether a secret put in this process's environment reached the program's output;
* whether a process of this script's that the program tried to kill is still alive.

Usage: ``python benchmarks/sandbox_containment.py [--markdown]`` (Linux; run as root to get the dedicated uid
and the kernel layers, as CI does).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from entrorl.rewards.code import CodeReward
from entrorl.rewards.sandbox import _SANDBOX_ID_BASE, _SANDBOX_ID_SPAN, SANDBOX_MARKER, SandboxCase, SandboxLimits, run_in_sandbox

SECRET_NAME = "ENTRORL_CONTAINMENT_SECRET"


def live_sandbox_processes() -> list[int]:
    """Live pids owned by any uid of the sandbox range or carrying its marker."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                if handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            owner = os.stat(f"/proc/{name}").st_uid
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except (OSError, IndexError):
            continue
        if _SANDBOX_ID_BASE <= owner < _SANDBOX_ID_BASE + _SANDBOX_ID_SPAN or SANDBOX_MARKER.encode() in cmdline:
            found.append(int(name))
    return found


def programs(port: int, outside: str, victim: int) -> dict[str, str]:
    return {
        "infinite loop": "while True:\n    pass",
        "sleep forever": "import time\ntime.sleep(3600)",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "many subprocesses": "import subprocess\nfor _ in range(100):\n    subprocess.Popen(['sleep', '60'])\nprint('ok')",
        "escaped child (setsid)": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                                   "print('ok')"),
        "write outside its directory": f"open({outside!r}, 'w').write('x')\nprint('ok')",
        "network to 127.0.0.1": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                 "s.sendall(b'hello')\nprint('ok')"),
        "read the environment": f"import os\nprint(os.environ[{SECRET_NAME!r}])",
        "read the parent's environ": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        "kill a process outside": f"import os, signal\nos.kill({victim}, signal.SIGKILL)\nprint('ok')",
        "kill it through a pidfd": (f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({victim}), signal.SIGKILL)\n"
                                    "print('ok')"),
        "overwrite memory with ctypes": "import ctypes\nctypes.memset(id(print) + 8, 0, 8)\nprint('ok')",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--time-limit", type=float, default=2.0, help="the reward's time_limit per case (s)")
    parser.add_argument("--no-audit-hook", action="store_true",
                        help="turn the in-interpreter audit hook off: only the kernel layers and limits contain the program")
    args = parser.parse_args(argv)

    secret = uuid.uuid4().hex
    os.environ[SECRET_NAME] = secret
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))  # loopback only, a port the kernel picks
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    victim = subprocess.Popen(["sleep", "600"])
    outside = os.path.join(tempfile.gettempdir(), f"entrorl-escape-{uuid.uuid4().hex}")
    reward = CodeReward(time_limit=args.time_limit, audit_hook=not args.no_audit_hook)
    tests = {"cases": [{"input": "", "output": "ok"}]}
    layers = run_in_sandbox("print('ok')", [SandboxCase("stdin", "")], SandboxLimits(audit_hook=not args.no_audit_hook)).isolation

    rows = []
    try:
        for name, source in programs(port, outside, victim.pid).items():
            started = time.perf_counter()
            verdict = reward("", f"```python\n{source}\n```", tests)
            wall = time.perf_counter() - started
            time.sleep(0.2)
            strays = live_sandbox_processes()
            try:
                connection, _ = server.accept()
                connection.close()
                connected = True
            except BlockingIOError:
                connected = False
            rows.append({
                "program": name, "score": float(verdict), "status": verdict.status, "wall_s": wall,
                "stray_processes": len(strays), "file_outside": os.path.exists(outside), "connection_made": connected,
                "secret_leaked": secret in (verdict.reason or "") or any(secret in str(case) for case in verdict.cases),
                "victim_alive": victim.poll() is None,
            })
            if os.path.exists(outside):
                os.remove(outside)
    finally:
        victim.kill()
        server.close()

    header = ["program", "score", "status", "wall s", "stray processes", "file outside", "connection made",
              "secret leaked", "victim alive"]
    keys = ["program", "score", "status", "wall_s", "stray_processes", "file_outside", "connection_made",
            "secret_leaked", "victim_alive"]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"euid {os.geteuid()}, time_limit {args.time_limit} s")
    # a layer is on when its note says True, and the user layer when it names the unprivileged uid it ran under
    active = ", ".join(sorted(key for key, value in layers.items() if value is True or value == "unprivileged uid"))
    print(f"active layers: {active}")
    print()
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row[key]:.2f}" if key == "wall_s" else str(row[key]) for key in keys]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    # contained = no effect outside the sandbox, and the call came back within the time limit plus start-up
    bound = args.time_limit + 1.0
    contained = all(row["stray_processes"] == 0 and not row["file_outside"] and not row["connection_made"]
                    and not row["secret_leaked"] and row["victim_alive"] and row["wall_s"] < bound for row in rows)
    zero = sum(row["score"] == 0.0 for row in rows)
    print()
    print(f"every program contained (no effect outside, each call < {bound:g} s): {contained}; "
          f"slowest call {max(row['wall_s'] for row in rows):.2f} s; scored 0: {zero} of {len(rows)}")
    return 0 if contained else 1


if __name__ == "__main__":
    sys.exit(main())
