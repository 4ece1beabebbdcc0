"""Apply each mutant in a copy of the repo, run its tests (-x), record killed/survived."""
import json, os, shutil, subprocess, sys, time
sys.path.insert(0, os.path.dirname(__file__))
from mutants import M
repo, phase, out = sys.argv[1], sys.argv[2], sys.argv[3]   # phase: before | guards
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
done = {}
if os.path.exists(out):
    done = {r["id"]: r for r in map(json.loads, open(out))}
for mid, f, old, new, nth, tests in M:
    if (only and mid not in only) or mid in done:
        continue
    path = os.path.join(repo, f)
    src = open(path).read()
    assert src.count(old) >= nth + 1, (mid, "pattern not found")
    i = -1
    for _ in range(nth + 1):
        i = src.index(old, i + 1)
    shutil.copy(path, path + ".orig")
    open(path, "w").write(src[:i] + new + src[i + len(old):])
    # the guard tests live in each module's own test file, so both phases run the mutant's set
    sel = tests
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *sel],
                           cwd=repo, capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        rc, tail = r.returncode, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
        failed = [l for l in r.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
    except subprocess.TimeoutExpired:
        rc, tail, failed = -1, "timeout", []
    finally:
        shutil.move(path + ".orig", path)
    rec = dict(id=mid, file=f, killed=rc != 0, rc=rc, secs=round(time.time() - t0, 1), tail=tail,
               failed=failed[:3])
    with open(out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(mid, "KILLED" if rc else "survived", rec["secs"], tail, flush=True)
