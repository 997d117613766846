"""The adversarial suite: how many examples and steps each machine ran, printed at the end of
the run (with ``-v``, how each call ended)."""
from advutil import STATS


def pytest_terminal_summary(terminalreporter):
    for name, c in sorted(STATS.items()):
        terminalreporter.write_line(f"adversarial {name}: {c['examples']} examples, "
                                    f"{c['steps']} steps")
        if terminalreporter.config.getoption("verbose") > 0:
            for k in sorted(c):
                if ":" in k:
                    terminalreporter.write_line(f"    {k}: {c[k]}")
