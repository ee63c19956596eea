#!/usr/bin/env python3
"""Median time from spawning `ferrite run --restore SNAPSHOT` to each of its debug-log
milestones (snapshot loaded, memory mapped, VM created, devices restored, vCPUs started).

Usage: scripts/restore-timeline.py SNAPSHOT_DIR [RUNS] [FERRITE_BINARY]
Take the snapshot first, e.g. `ferrite run --kernel testguest.elf --memory 512M --api-socket S`
and `{"op":"snapshot","path":"SNAPSHOT_DIR"}` on S. Each run is killed once its vCPUs started.
"""
import datetime
import os
import re
import statistics
import subprocess
import sys

snap = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
binary = sys.argv[3] if len(sys.argv) > 3 else "target/x86_64-unknown-linux-gnu/release/ferrite"
marks = {}
for _ in range(runs):
    env = dict(os.environ, FERRITE_LOG="debug", NO_COLOR="1")
    start = datetime.datetime.now(datetime.timezone.utc).timestamp()
    p = subprocess.Popen([binary, "run", "--restore", snap, "--console", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    for raw in p.stdout:
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw.decode(errors="replace"))
        m = re.match(r"(\S+Z)\s+DEBUG\s+\S+:\s+(.*)", line)
        if not m:
            continue
        ts = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
        marks.setdefault(m.group(2).split("  ")[0][:48], []).append((ts - start) * 1000)
        if "vCPUs started" in line:
            break
    p.kill()
    p.wait()
for name, values in marks.items():
    print(f"{statistics.median(values):7.2f} ms  {name}  (n={len(values)})")
