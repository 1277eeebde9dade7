"""Run a command and trace its resident memory: each rise of 50 MB or more, interleaved with the command's own
output lines, each stamped with seconds since start; the peak at the end. Where `/usr/bin/time` gives only the
peak (benchmarks/owner_memory.py), this shows which phase holds the memory.

    python benchmarks/rss_trace.py python -m offsite_ds emulate CKPT --layout 2-14-2 --fit ... > trace.log

RSS is sampled every 0.2 s from /proc (Linux), so a shorter spike can be missed: the peak printed is a lower
bound of /usr/bin/time's. Progress bars show their last state per line.
"""
import subprocess
import sys
import threading
import time


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python benchmarks/rss_trace.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    t0 = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak_kb = [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            except (FileNotFoundError, StopIteration):
                break
            if kb > peak_kb[0] + 50_000:
                print(f"{time.time() - t0:7.1f}s RSS {kb / 1e6:.2f} GB", flush=True)
            peak_kb[0] = max(peak_kb[0], kb)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        print(f"{time.time() - t0:7.1f}s | {line.rstrip().split(chr(13))[-1]}", flush=True)
    proc.wait()
    print(f"peak GB {peak_kb[0] / 1e6} rc {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
