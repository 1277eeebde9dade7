"""Peak RSS of a command, and where it happens: sample the child's VmRSS (RssAnon, RssFile) every 50 ms and print
each new maximum 20 MB or more above the last one printed, with the last line of the command's output then (its
progress bar names the phase), and finally the peak. /usr/bin/time -v gives the same peak; this says when.

    python experiments/rss_timeline.py CMD.log python -m offsite_ds emulate CKPT --layout 2-14-2 ... > timeline.txt
GB = kB x 1024 / 1e9, as benchmarks/owner_memory.py reports.
"""
import subprocess
import sys
import time

log_path, command = sys.argv[1], sys.argv[2:]


def last_line() -> str:
    with open(log_path, "rb") as f:
        lines = [x for x in f.read()[-4000:].replace(b"\r", b"\n").split(b"\n") if x.strip()]
    return lines[-1].decode(errors="replace")[:150] if lines else ""


def gb(kb: int) -> str:
    return f"{kb * 1024 / 1e9:.3f}"


with open(log_path, "wb") as log:
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    best, printed, start = 0, 0, time.time()
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                status = {x.split(":")[0]: int(x.split()[1]) for x in f if x.startswith(("VmRSS", "RssAnon", "RssFile"))}
        except (OSError, ValueError):
            status = {}
        rss = status.get("VmRSS", 0)
        if rss > best:
            best = rss
            if best - printed > 20000:
                printed = best
                print(f"{time.time() - start:7.1f}s {gb(best)} GB (anon {gb(status['RssAnon'])} file "
                      f"{gb(status['RssFile'])}) | {last_line()}", flush=True)
        time.sleep(0.05)
print(f"rc {child.returncode} peak {best} kB = {gb(best)} GB | {last_line()}")
sys.exit(child.returncode)
