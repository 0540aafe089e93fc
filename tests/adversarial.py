"""Run batches of adversarial cases in a child process and check each one's outcome.

A case is a snippet of Python run after a shared prelude; it either must raise an exception of
a given type whose message matches a pattern, or must finish (its own asserts check that the
answer is right). Cases that could kill a process (a C++ abort, an allocation of terabytes) run
in a child: the child reports each case's outcome as one JSON line as soon as it is known, so a
crash still tells which case caused it, and the parent fails the test with that case's name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every batch runs with this memory bound (see sigma_fast._checks.check_alloc), so the sizes
# that must be refused are refused the same way on every machine.
MAX_ALLOC = 1 << 30


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    raises: str | None = None  # exception class name (or a base of it); None: must finish
    match: str = ""            # regex searched in the message

    def __post_init__(self):
        if self.raises is None and self.match:
            raise ValueError(f"case {self.name}: match without raises")


_CHILD = r"""
import json, sys, traceback
results = open(sys.argv[1], "w", buffering=1)
prelude, cases = json.load(open(sys.argv[2]))
shared = {}
exec(compile(prelude, "<prelude>", "exec"), shared)
for name, code in cases:
    results.write(json.dumps({"name": name, "started": True}) + "\n")
    ns = dict(shared)
    try:
        exec(compile(code, f"<case {name}>", "exec"), ns)
        out = {"name": name, "raised": None}
    except Exception as exc:  # every outcome is reported, the parent judges it
        out = {"name": name, "raised": type(exc).__name__,
               "mro": [c.__name__ for c in type(exc).__mro__],
               "message": str(exc)[:2000], "trace": traceback.format_exc()[-3000:]}
    results.write(json.dumps(out) + "\n")
"""


def run_batch(cases: list[Case], prelude: str, tmp_path: Path, *, env: dict | None = None,
              timeout: float = 600) -> list[str]:
    """Run ``cases`` in one child process; return the list of failures (empty when every case
    behaved as expected). A child that dies is a failure naming the case it died in."""
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "cases.json"
    out = tmp_path / "results.jsonl"
    spec.write_text(json.dumps([textwrap.dedent(prelude),
                                [(c.name, textwrap.dedent(c.code)) for c in cases]]))
    child_env = {**os.environ, "SIGMA_FAST_MAX_ALLOC_BYTES": str(MAX_ALLOC),
                 "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"),
                                                os.environ.get("PYTHONPATH", "")]),
                 **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(spec)], env=child_env,
                          capture_output=True, text=True, timeout=timeout)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {r["name"]: r for r in records if "started" not in r}
    failures = []
    if proc.returncode != 0:
        started = [r["name"] for r in records if "started" in r]
        last = started[-1] if started else "(before the first case)"
        failures.append(f"the child process died (exit code {proc.returncode}) in case {last}:"
                        f"\n{proc.stderr[-3000:]}")
    for case in cases:
        got = done.get(case.name)
        if got is None:
            if proc.returncode == 0:
                failures.append(f"{case.name}: no result")
            continue
        failures += _judge(case, got)
    return failures


def _judge(case: Case, got: dict) -> list[str]:
    if case.raises is None:
        if got["raised"] is not None:
            return [f"{case.name}: expected no exception; got {got['raised']}: "
                    f"{got['message']}\n{got['trace']}"]
        return []
    if got["raised"] is None:
        return [f"{case.name}: expected {case.raises} matching {case.match!r}; nothing raised"]
    if case.raises not in got["mro"]:
        return [f"{case.name}: expected {case.raises}; got {got['raised']}: {got['message']}"
                f"\n{got['trace']}"]
    if case.match and not re.search(case.match, got["message"]):
        return [f"{case.name}: {got['raised']} message does not match {case.match!r}: "
                f"{got['message']}"]
    return []
