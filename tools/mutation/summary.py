"""Kill-rate summary of the hand-planted mutants (issue 14): before = a run of the suite without
the guard tests, guards = a run with them (they now sit in each module's test file). The runs'
records are outputs, not kept in git (results/ is git-ignored).

    python tools/mutation/run.py REPO_COPY before results/before.jsonl   # plants each mutant in a COPY
    python tools/mutation/run.py REPO_COPY guards results/guards_final.jsonl
    python tools/mutation/summary.py
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutants import M
def load(*fs):
    d = {}
    for f in fs:
        try:
            for r in map(json.loads, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f))):
                d[r["id"]] = r
        except FileNotFoundError:
            pass
    return d
before = load("before.jsonl", "before_b.jsonl")
g_stale = load("guards.jsonl")
g_final = load("guards_final.jsonl")
guards = {**g_stale, **g_final}
rows, killed_after, killed_before_known, before_measured = [], 0, 0, 0
for mid, f, old, new, nth, tests in M:
    b = before.get(mid); g = guards.get(mid)
    bk = None if b is None else b["killed"]
    gk = None if g is None else g["killed"]
    after = bool(bk) or bool(gk)
    killed_after += after
    if bk is not None:
        before_measured += 1; killed_before_known += bk
    print(f"{mid:4} {f.split('/')[-1]:18} suite={'-' if bk is None else ('K' if bk else 'S')} "
          f"guards={'-' if gk is None else ('K' if gk else 'S')}  {old.strip()[:60]!r} -> {new.strip()[:60]!r}")
print(f"mutants {len(M)}; killed after (suite or guards) {killed_after}; "
      f"suite alone measured on {before_measured}: killed {killed_before_known}")
unknown = [m[0] for m in M if not guards.get(m[0], {}).get("killed") and m[0] not in before]
print("undetermined:", unknown)
