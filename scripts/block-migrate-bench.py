#!/usr/bin/env python3
"""Block migration measurement: a test guest with a local raw disk holding data migrates to a
`ferrite run --incoming tcp:127.0.0.1:PORT --incoming-disk-dir DIR` on the same host with
`copy_disks`, idle or while it writes its disk (`blk-stream`). Prints, per run, the source's
own figures (total time, downtime, rounds, bytes sent, disk bytes) from `migrate-status`.

Usage: scripts/block-migrate-bench.py [--memory 512M] [--disk-mib 1024] [--data-mib 256]
                                      [--runs 3] [--workloads idle,writing] [--bandwidth 0]
Needs FERRITE_ASSETS (testguest.elf) and a built target/x86_64-unknown-linux-gnu/release/ferrite.
"""

import argparse
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/ferrite")


def lines_of(proc):
    q = queue.Queue()

    def pump():
        for raw in proc.stdout:
            q.put(raw.decode(errors="replace").rstrip("\r\n"))
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def wait_line(q, prefix, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = q.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise RuntimeError(f"console ended before {prefix!r}")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no {prefix!r} within {timeout} s")


def request(sock, obj):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall((json.dumps(obj) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(args, workload, tmp, n):
    disk = os.path.join(tmp, f"disk{n}.img")
    with open(disk, "wb") as f:
        f.truncate(args.disk_mib << 20)
        # Incompressible data in the first data-mib MiB (the rest is a hole).
        chunk = os.urandom(1 << 20)
        for i in range(args.data_mib):
            f.write(chunk[i % 7:] + chunk[: i % 7])
    ddir = os.path.join(tmp, f"dst{n}")
    os.mkdir(ddir)
    ssock, dsock = os.path.join(tmp, f"s{n}.sock"), os.path.join(tmp, f"d{n}.sock")
    cmds = ""
    if workload == "writing":
        # Rewrites the first 64 MiB of the disk, 64 KiB at a time, for as long as it runs.
        cmds = "cmds=\"blk-stream 0 0 131072 1\""
    src_args = [FERRITE, "run", "--kernel", os.path.join(os.environ["FERRITE_ASSETS"], "testguest.elf"),
                "--memory", args.memory, "--disk", f"{disk},format=raw", "--api-socket", ssock]
    if cmds:
        src_args += ["--cmdline", cmds]
    src = subprocess.Popen(src_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = free_port()
    dst = subprocess.Popen([FERRITE, "run", "--incoming", f"tcp:127.0.0.1:{port}", "--incoming-disk-dir", ddir,
                            "--api-socket", dsock], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        sq, dq = lines_of(src), lines_of(dst)
        wait_line(sq, "FERRITE-TESTGUEST READY")
        if workload == "writing":
            wait_line(sq, "blk-stream writes=")
        time.sleep(1)
        req = {"op": "migrate", "to": f"tcp:127.0.0.1:{port}", "copy_disks": True,
               "bandwidth_mib_s": args.bandwidth}
        reply = request(ssock, req)
        assert reply.get("ok"), reply
        last = None
        while src.poll() is None:
            try:
                last = request(ssock, {"op": "migrate-status"})["migration"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        err = src.stderr.read().decode(errors="replace")
        line = next((l for l in err.splitlines() if "migrated to" in l), None)
        if src.returncode != 5 or line is None:
            raise RuntimeError(f"source exited {src.returncode}: {err[-2000:]} (last status {last})")
        # The guest runs on at the destination.
        if workload == "writing":
            wait_line(dq, "blk-stream writes=")
        else:
            dst.stdin.write(b"echo alive\n")
            dst.stdin.flush()
            wait_line(dq, "OK echo alive")
        return line.split("migrated to ", 1)[1]
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
            p.wait()
        os.remove(disk)
        shutil.rmtree(ddir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", default="idle,writing")
    ap.add_argument("--bandwidth", type=int, default=0, help="MiB/s, 0: unlimited")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ferrite-blkmig-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        for workload in args.workloads.split(","):
            for n in range(args.runs):
                print(f"{workload} run {n + 1}: {one_run(args, workload, tmp, n)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
