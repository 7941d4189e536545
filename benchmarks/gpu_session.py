"""One device-machine call: GPU tests, NS benchmark, max-logit benchmark; results into $OUT.

    python benchmarks/gpu_session.py [--quick] [--sweep] [--skip-tests]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--ns-cases", default="")
    p.add_argument("--ml-args", default="")
    p.add_argument("--skip-ns", action="store_true")
    p.add_argument("--skip-ml", action="store_true")
    args = p.parse_args()
    out = os.environ.get("OUT", os.path.join(HERE, "results"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    t0 = time.time()
    if not args.skip_ns:
        cmd = [sys.executable, os.path.join(HERE, "ns_kernels.py"), "--out", out]
        if args.sweep:
            cmd.append("--sweep")
        if args.no_compile:
            cmd.append("--no-compile")
        if args.ns_cases:
            cmd += ["--cases", args.ns_cases]
        subprocess.run(cmd, cwd=ROOT, env=env)
        print(f"[session] ns done {time.time() - t0:.0f}s", flush=True)
    if not args.skip_ml:
        cmd = [sys.executable, os.path.join(HERE, "max_logit.py"), "--out", out] + args.ml_args.split()
        if args.sweep:
            cmd.append("--sweep")
        subprocess.run(cmd, cwd=ROOT, env=env)
        print(f"[session] ml done {time.time() - t0:.0f}s", flush=True)
    if not args.skip_tests:
        with open(os.path.join(out, "gpu_tests.txt"), "w") as log:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-rA", "tests/gpu", "-p", "no:cacheprovider"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log.write(proc.stdout)
        print("\n".join(l for l in proc.stdout.splitlines() if l.startswith(("NS", "PASSED", "FAILED", "ERROR", "="))),
              flush=True)
        print(f"[session] tests done {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
