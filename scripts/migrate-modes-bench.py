#!/usr/bin/env python3
"""Migration modes measured against each other (pre-copy, post-copy, parallel round 0): a test guest that filled MEM_FILL MiB of its RAM and
rewrites DIRTY MiB of it at RATE pages/s (the `dirty` workload) migrates to a
`ferrite run --incoming tcp:127.0.0.1:PORT` on the same host, as pre-copy, pure post-copy
(`postcopy`), post-copy after one pre-copy pass (`precopy_rounds: 1`) and pre-copy with
round 0 over four connections (`connections: 4`). Prints, per run,
the source's own line (downtime: pause to the destination running; total: until every page
is across) and the guest's view on the destination: the longest gap of its loop in the first
ten ticks there (the pause, plus, after a post-copy switch, the waits for fetched pages).

Usage: scripts/migrate-modes-bench.py [--memory 512M] [--fill-mib 256] [--dirty-mib 64]
                                       [--rate 20000] [--runs 3]
                                       [--modes precopy,postcopy,hybrid,parallel]
Needs FERRITE_ASSETS (testguest.elf) and a built target/x86_64-unknown-linux-gnu/release/ferrite.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

# The console, control-socket and port helpers of the block migration measurement.
_spec = importlib.util.spec_from_file_location(
    "blockbench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "block-migrate-bench.py"))
bb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bb)

MODES = {
    "precopy": {},
    "postcopy": {"postcopy": True},
    "hybrid": {"postcopy": True, "precopy_rounds": 1},
    "parallel": {"connections": 4},
}


def field(line, name):
    for part in line.split():
        if part.startswith(name + "="):
            return int(part.split("=", 1)[1])
    raise ValueError(f"no {name} in {line!r}")


def one_run(args, mode, tmp, n):
    ssock, dsock = os.path.join(tmp, f"s{n}.sock"), os.path.join(tmp, f"d{n}.sock")
    cmds = f"mem-fill 5 {args.fill_mib};dirty {args.dirty_mib} {args.rate} 50"
    src = subprocess.Popen([bb.FERRITE, "run", "--kernel",
                            os.path.join(os.environ["FERRITE_ASSETS"], "testguest.elf"),
                            "--memory", args.memory, "--api-socket", ssock,
                            "--cmdline", f"cmds=\"{cmds}\""],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = bb.free_port()
    dst = subprocess.Popen([bb.FERRITE, "run", "--incoming", f"tcp:127.0.0.1:{port}",
                            "--api-socket", dsock],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sq, dq = bb.lines_of(src), bb.lines_of(dst)
        bb.wait_line(sq, "tick n=10 ")
        req = {"op": "migrate", "to": f"tcp:127.0.0.1:{port}", **MODES[mode]}
        reply = bb.request(ssock, req)
        assert reply.get("ok"), reply
        src.wait(timeout=300)
        err = src.stderr.read().decode(errors="replace")
        line = next((l for l in err.splitlines() if "migrated to" in l), None)
        if src.returncode != 5 or line is None:
            raise RuntimeError(f"source exited {src.returncode}: {err[-2000:]}")
        gaps = [field(bb.wait_line(dq, "tick "), "gap_us") for _ in range(10)]
        dst.stdin.write(b"x")
        dst.stdin.flush()
        bb.wait_line(dq, "OK dirty stopped")
        dst.stdin.write(b"dirty-check\n")
        dst.stdin.flush()
        check = bb.wait_line(dq, "OK dirty-check")
        return f"{line.split('migrated to ', 1)[1]}; guest max gap {max(gaps) / 1000:.1f} ms; {check}"
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--fill-mib", type=int, default=256)
    ap.add_argument("--dirty-mib", type=int, default=64)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="precopy,postcopy,hybrid,parallel")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ferrite-postcopy-")
    for mode in args.modes.split(","):
        for n in range(args.runs):
            print(f"{mode} run {n + 1}: {one_run(args, mode, tmp, n)}", flush=True)
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
