"""Print a pytest-benchmark JSON file as a table of rates with ratios inside each group.

Usage: python bench/report.py results.json

Each row gives the median rate and the best round's rate (the machine is shared: the best round
is the one least disturbed), the tier a sevcore row ran on (benchutil.on_tier), and, where the
row recorded one, its share of the AES-unit limit of its register width (median / best).
"""
import json
import sys


def rate_of(b, seconds):
    extra = b.get("extra_info", {})
    if "openssl_speed_pages_per_s" in extra:
        return extra["openssl_speed_pages_per_s"], "pages"
    if "items" in extra:
        return extra["items"] / seconds, extra.get("unit", "items")
    return 1 / seconds, "calls"


def main(path):
    data = json.load(open(path))
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or "", []).append(b)
    machine = data.get("machine_info", {})
    cpus = {b.get("extra_info", {}).get("cpu") for b in data["benchmarks"]} - {None}
    print(f"# {', '.join(sorted(cpus)) or machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"python {machine.get('python_version', '?')}\n")
    for group, rows in groups.items():
        print(f"## {group}\n")
        print("| benchmark | tier | median | rate (median) | rate (best) | vs fastest | of limit |")
        print("|---|---|---|---|---|---|---|")
        rated = []
        for b in rows:
            med, best = b["stats"]["median"], b["stats"]["min"]
            rate, unit = rate_of(b, med)
            brate, _ = rate_of(b, best)
            extra = b.get("extra_info", {})
            limit = extra.get("limit_pages_per_s")
            share = f"{rate / limit:.0%} / {brate / limit:.0%}" if limit else ""
            rated.append((b["name"], extra.get("tier", ""), med, rate, brate, unit, share))
        top = max(r[3] for r in rated)
        for name, tier, med, rate, brate, unit, share in sorted(rated, key=lambda r: -r[3]):
            print(f"| {name} | {tier} | {fmt_time(med)} | {fmt_rate(rate)} {unit}/s | "
                  f"{fmt_rate(brate)} {unit}/s | {rate / top:.3f} | {share} |")
        print()
        for name, extra in ((b["name"], b.get("extra_info", {})) for b in rows):
            if "ratio_median" in extra and "peer_name" in extra:
                print(f"- {name}: against {extra['peer_name']}, interleaved rounds: median "
                      f"{extra['ratio_median']:.2f}x, best {extra['ratio_best']:.2f}x "
                      f"(load average {', '.join(f'{x:.2f}' for x in extra['loadavg'])})")
            elif "ratio_median" in extra:
                print(f"- {name}: sevcore {fmt_rate(extra['sevcore_pages_per_s'])} pages/s, "
                      f"OpenSSL EVP {fmt_rate(extra['openssl_evp_pages_per_s'])} pages/s "
                      f"(medians of the interleaved calls): {extra['ratio_median']:.2f}x, "
                      f"best calls {extra['ratio_best']:.2f}x")
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
