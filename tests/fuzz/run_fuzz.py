"""Run every fuzz harness for a bounded time, one after the other (CI's fuzz stage).

Each harness starts from its committed seed corpus; what it adds goes to a scratch folder that
is dropped, with the files the harness works on ($SEVCORE_FUZZ_SCRATCH, see fuzz_owner.py). A
crash, a contract violation or a hang (an input running longer than libFuzzer's ``-timeout``)
fails the run: the input is printed in base64 and kept in ``--artifacts``, to be added under
``tests/fuzz/regressions/<harness>/`` with the fix.

    python tests/fuzz/run_fuzz.py --seconds 20 [--artifacts DIR] [harness ...]
"""
import argparse
import base64
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
HARNESSES = ("stream", "packets", "owner")


def run(harness, seconds, artifacts):
    """Fuzz one harness; returns (ok, summary line)."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{harness}-", dir=shm) as scratch:
        prefix = artifacts / f"{harness}-"
        found = pathlib.Path(scratch, "found")
        found.mkdir()
        cmd = [sys.executable, str(HERE / f"fuzz_{harness}.py"), f"-max_total_time={seconds}",
               "-print_final_stats=1", f"-artifact_prefix={prefix}", str(found),
               str(HERE / "corpus" / harness)]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE,
                              env=dict(os.environ, SEVCORE_FUZZ_SCRATCH=scratch))
        took = time.monotonic() - start
    log = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting")]
    stat = dict(re.findall(r"^stat::(\w+):\s+(\d+)", proc.stderr, re.M))
    seed = re.search(r"INFO: Seed: (\d+)", proc.stderr)
    summary = (f"fuzz_{harness}: {stat.get('number_of_executed_units', '?')} inputs in "
               f"{took:.0f} s, {stat.get('new_units_added', '?')} new, "
               f"seed {seed.group(1) if seed else '?'}")
    if proc.returncode == 0:
        return True, summary
    print("\n".join(log[-60:]), file=sys.stderr)
    for crash in sorted(artifacts.glob(f"{harness}-*")):
        print(f"{crash}: {base64.b64encode(crash.read_bytes()).decode()}", file=sys.stderr)
    return False, f"{summary}: FAILED (exit {proc.returncode})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=20, help="per harness (default 20)")
    ap.add_argument("--artifacts", type=pathlib.Path, default=None,
                    help="where failing inputs are kept (default: a new temporary folder)")
    ap.add_argument("harness", nargs="*", help=f"some of {', '.join(HARNESSES)} (default all)")
    args = ap.parse_args(argv)
    unknown = set(args.harness) - set(HARNESSES)
    if unknown:
        ap.error(f"no harness {', '.join(sorted(unknown))}")
    artifacts = args.artifacts or pathlib.Path(tempfile.mkdtemp(prefix="fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    ok = True
    for harness in args.harness or HARNESSES:
        passed, summary = run(harness, args.seconds, artifacts)
        print(summary, flush=True)
        ok &= passed
    if args.artifacts is None and not any(artifacts.iterdir()):
        artifacts.rmdir()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
