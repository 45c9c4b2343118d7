"""Top SASS lines of an ncu source page (CSV) by stall samples and by excess shared wavefronts."""
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
# the header is the first row that names "Source"
hi = next(i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r))
head = [c.strip() for c in rows[hi]]
data = [r for r in rows[hi + 1:] if len(r) == len(head)]
print("columns:", head)
def col(*keys):
    for i, h in enumerate(head):
        if all(k.lower() in h.lower() for k in keys):
            return i
    return None
src = col("Source")
def num(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
for title, keys in (("stall samples (all)", ("Stall Sampling", "All")), ("stall samples (not issued)", ("Stall Sampling", "Not")),
                    ("shared excessive wavefronts", ("Shared", "Excessive")), ("local / spill", ("Local",))):
    c = col(*keys)
    if c is None:
        print("no column", keys); continue
    tot = sum(num(r[c]) for r in data)
    print(f"\n== {title}: column {head[c]!r}, total {tot:.0f}")
    for r in sorted(data, key=lambda r: -num(r[c]))[:45]:
        if num(r[c]) <= 0: break
        print(f"{num(r[c]):10.0f} {100*num(r[c])/max(tot,1):5.1f}%  {r[src][:110]}")
# stall samples by instruction kind (opcode)
c = col("Stall Sampling", "All")
if c is not None:
    by = collections.Counter()
    for r in data:
        op = r[src].strip().split(" ")[0] if r[src].strip() else "?"
        if op.startswith("@"): op = r[src].strip().split(" ")[1]
        by[op.split(".")[0]] += num(r[c])
    tot = sum(by.values())
    print("\n== stall samples by opcode")
    for op, v in by.most_common(30):
        print(f"{v:10.0f} {100*v/tot:5.1f}%  {op}")
