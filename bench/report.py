"""Print a pytest-benchmark JSON file as a table of median rates with ratios inside each group.

Usage: python bench/report.py results.json
"""
import json
import sys


def main(path):
    data = json.load(open(path))
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or "", []).append(b)
    machine = data.get("machine_info", {})
    print(f"# {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"python {machine.get('python_version', '?')}\n")
    for group, rows in groups.items():
        print(f"## {group}\n")
        print("| benchmark | median | rate | vs fastest |")
        print("|---|---|---|---|")
        rated = []
        for b in rows:
            med = b["stats"]["median"]
            extra = b.get("extra_info", {})
            if "openssl_speed_pages_per_s" in extra:
                rate = extra["openssl_speed_pages_per_s"]
                unit = "pages"
            elif "items" in extra:
                rate = extra["items"] / med
                unit = extra.get("unit", "items")
            else:
                rate, unit = 1 / med, "calls"
            rated.append((b["name"], med, rate, unit))
        best = max(r[2] for r in rated)
        for name, med, rate, unit in sorted(rated, key=lambda r: -r[2]):
            print(f"| {name} | {fmt_time(med)} | {fmt_rate(rate)} {unit}/s | {rate / best:.3f} |")
        print()


def fmt_time(s):
    for unit, f in (("s", 1), ("ms", 1e3), ("us", 1e6), ("ns", 1e9)):
        if s * f >= 1:
            return f"{s * f:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_rate(r):
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= f:
            return f"{r / f:.3g} {unit}"
    return f"{r:.3g}"


if __name__ == "__main__":
    main(sys.argv[1])
