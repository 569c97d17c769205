"""`proxmox.upload` of a 2 GiB qcow2 to the PVE emulator vs a raw streamed POST of the same body (issue 4).

Goal: peak RSS of the uploading process <= 150 MiB, time <= 1.1x the raw POST. The tool's time is the whole
`upload` (the "already there?" lookup, the POST, waiting for the task); the raw side is one `requests.post` of
the same multipart fields and file, streamed with its Content-Length, nothing else. Each upload runs in a fresh
interpreter against a fresh emulator (`python -m tests.pve.emulator`), so each side's peak RSS is its own.

    .venv/bin/python -m bench.upload_vs_raw_post [--size-gib 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench._common import PROJECT, report
from builder import proxmox
from builder.build import sha256_file
from builder.proxmox import Pve, Target, TlsPolicy

MiB = 1024 * 1024
GiB = 1024 * MiB
RSS_GOAL_MIB = 150
TIME_GOAL = 1.1
STORAGE = "local"  # the emulator's directory storage that takes content import
Measured = dict[str, Any]


# --- the test image ----------------------------------------------------------------------------------------


def make_image(directory: Path, size: int) -> Path:
    """A real qcow2 header (the emulator checks the magic; PVE lists the virtual size) padded with random bytes
    to `size`: one random MiB repeated, which is as incompressible as fresh randomness to TLS and costs nothing."""
    path = directory / f"bench-upload-{uuid.uuid4().hex[:8]}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4G"], check=True)
    block = os.urandom(MiB)
    with path.open("ab") as f:
        left = size - f.tell()
        while left > 0:
            left -= f.write(block[: min(left, MiB)])
        # On disk before the first upload starts: its writeback would otherwise share the CPU with that upload.
        f.flush()
        os.fsync(f.fileno())
    return path


# --- the children: an emulator, an uploader ----------------------------------------------------------------


def usage() -> Measured:
    """This process's peak RSS (the kernel's high-water mark, KiB on Linux) and CPU seconds so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mib": own.ru_maxrss / 1024, "cpu": own.ru_utime + own.ru_stime}


def upload_with_tool(server: Measured, path: Path, sha256: str) -> float:
    """What the deploy does (pve_deploy.upload_image): a Pve with the pinned fingerprint, then `upload`."""
    target = Target(server["url"], "pve", {"import": STORAGE}, "vmbr0", TlsPolicy(fingerprint=server["fingerprint"]),
                    proxmox.parse_token(server["token"]))
    pve = Pve(target)
    started = time.monotonic()
    result = proxmox.upload(pve, STORAGE, "import", path, sha256)
    elapsed = time.monotonic() - started
    assert not result.skipped, result
    return elapsed


def upload_raw(server: Measured, path: Path, sha256: str) -> float:
    """One requests.post to the same endpoint, the certificate checked against the emulator's CA."""
    tokenid, _, secret = server["token"].rpartition("=")
    # The same multipart bytes the tool sends (its body class, without the progress callback), nothing else.
    body = proxmox.MultipartBody({"content": "import", "checksum": sha256, "checksum-algorithm": "sha256"},
                                 "filename", path)
    headers = {"Authorization": f"PVEAPIToken={tokenid}={secret}", "Content-Type": body.content_type}
    started = time.monotonic()
    response = requests.post(f"{server['url']}/api2/json/nodes/pve/storage/{STORAGE}/upload", data=body,
                             headers=headers, verify=server["ca_file"], timeout=(10, 600))
    elapsed = time.monotonic() - started
    response.raise_for_status()
    assert str(response.json()["data"]).startswith("UPID:"), response.text
    return elapsed


SIDES: dict[str, Callable[[Measured, Path, str], float]] = {"raw": upload_raw, "tool": upload_with_tool}


def client(side: str, server_json: str, path: str, sha256: str) -> None:
    seconds = SIDES[side](json.loads(server_json), Path(path), sha256)
    print(json.dumps({"seconds": seconds, **usage()}), flush=True)


# --- the parent ----------------------------------------------------------------------------------------------


def child(module: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    # A fresh interpreter on this checkout: the worktree's builder and tests, whatever the caller's cwd.
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT, text=True, stdout=subprocess.PIPE,
                            **kwargs)


@contextmanager
def emulator(tmp: Path) -> Iterator[tuple[Measured, Measured]]:
    """A fresh emulator process (tests/pve/emulator.py's main) per upload: a kept volume would turn the next tool
    upload into a skip. Yields its address and, filled in once it has stopped, its own usage."""
    # Its uploads and volumes go where the image is: /var/tmp, on disk.
    proc = child("tests.pve.emulator", stdin=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None and proc.stdin is not None
    server: Measured = json.loads(proc.stdout.readline())
    after: Measured = {}
    try:
        yield server, after
    finally:
        proc.stdin.close()
        # wait4 rather than Popen.wait: the kernel's account of the process, peak RSS included.
        _, status, own = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        after.update(rss_mib=own.ru_maxrss / 1024, cpu=own.ru_utime + own.ru_stime)


def measure(side: str, tmp: Path, image: Path, sha256: str, label: str = "") -> Measured:
    with emulator(tmp) as (server, after):
        proc = child("bench.upload_vs_raw_post", "--client", side, json.dumps(server), str(image), sha256)
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the {side} upload failed (exit {proc.returncode})")
        run: Measured = json.loads(out.splitlines()[-1])
    print(f"  {label or side:<12} {run['seconds']:6.2f} s  client {run['rss_mib']:5.1f} MiB, {run['cpu']:5.2f} s CPU;  "
          f"emulator {after.get('rss_mib', 0):5.1f} MiB, {after.get('cpu', 0):5.2f} s CPU", flush=True)
    return run


def compare(size: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="homelab-bench-upload-", dir="/var/tmp") as name:
        tmp = Path(name)
        image = make_image(tmp, size)
        sha256 = sha256_file(image)
        # Untimed: the first upload of a run is the slow one (the page cache takes memory the VM has not touched
        # yet); it would burden whichever side came first.
        measure("raw", tmp, image, sha256, label="warm-up raw")
        runs: dict[str, list[Measured]] = {"raw": [], "tool": []}
        for n in range(rounds):
            # Alternate who goes first so neither side always gets the warmer page cache or the quieter moment.
            for side in ("raw", "tool") if n % 2 == 0 else ("tool", "raw"):
                runs[side].append(measure(side, tmp, image, sha256))
        shutil.rmtree(tmp, ignore_errors=True)
    raw, tool = (min(r["seconds"] for r in runs[side]) for side in ("raw", "tool"))
    rss = {side: max(r["rss_mib"] for r in runs[side]) for side in runs}
    label = f"{size / GiB:g} GiB, best of {rounds}"
    report([(f"raw requests.post ({label})", raw), (f"homelab upload ({label})", tool),
            ("peak RSS raw POST MiB", rss["raw"]), ("peak RSS homelab upload MiB", rss["tool"])],
           "time ratio tool/raw", tool, raw, f"≤ {TIME_GOAL}x")
    print(f"peak RSS (tool): {rss['tool']:.0f} MiB (goal ≤ {RSS_GOAL_MIB} MiB)")
    # Wall times swing with whatever else shares the CPU; each client's own CPU time (startup included) hardly.
    cpu = {side: statistics.median(r["cpu"] for r in runs[side]) for side in runs}
    print(f"client CPU per upload, median: tool {cpu['tool']:.2f} s, raw {cpu['raw']:.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_vs_raw_post",
                                     description="homelab upload vs a raw POST of the same file")
    parser.add_argument("--size-gib", type=float, default=2.0, help="image size (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="uploads per side, order alternating (default 3)")
    parser.add_argument("--client", nargs=4, metavar=("SIDE", "SERVER", "FILE", "SHA256"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(*args.client)
    else:
        compare(int(args.size_gib * GiB), args.rounds)


if __name__ == "__main__":
    main()
