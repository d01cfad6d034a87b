#!/usr/bin/env bash
# The table `make mutants` ends with: per module, how many mutants the tests caught, missed,
# could not build (unviable) and timed out on, read from each run's outcomes.json; then every
# missed mutant, which needs a test or a reason in .cargo/mutants.toml.
set -euo pipefail
OUT="${1:-target/mutants}"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows, missed = [], []
for f in sorted(out.glob("*/mutants.out/outcomes.json")):
    name = f.parent.parent.name
    data = json.loads(f.read_text())
    counts = {"caught": 0, "missed": 0, "unviable": 0, "timeout": 0}
    for o in data.get("outcomes", []):
        s = o.get("summary", "")
        if s == "CaughtMutant": counts["caught"] += 1
        elif s == "MissedMutant":
            counts["missed"] += 1
            scen = o.get("scenario", {})
            m = scen.get("Mutant", scen) if isinstance(scen, dict) else {}
            missed.append(f"{name}: {m.get('name') or json.dumps(m)[:160]}")
        elif s == "Unviable": counts["unviable"] += 1
        elif s == "Timeout": counts["timeout"] += 1
    rows.append((name, counts))
print(f"{'module':<24}{'caught':>8}{'missed':>8}{'unviable':>10}{'timeout':>9}")
for name, c in rows:
    print(f"{name:<24}{c['caught']:>8}{c['missed']:>8}{c['unviable']:>10}{c['timeout']:>9}")
if missed:
    print("\nmissed (each needs a test or a reason in .cargo/mutants.toml):")
    print("\n".join("  " + m for m in missed))
PY
