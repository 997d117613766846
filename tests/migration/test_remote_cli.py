"""Migration between two processes over TCP, a target killed mid-copy, and the sevcore command."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sevcore.cli import main
from sevcore.migration.engine import MigrationError, MigrationParams
from sevcore.migration.remote import send_to

from support.migration import assert_runs_on, launched, memory_snapshot


def _target_process(tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "sevcore", "migrate", "--listen", "0",
                             "--port-file", str(port_file), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"target did not start: {proc.communicate()}")
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def test_two_processes_over_tcp(tmp_path):
    """A target process receives the guest over TCP; its guest resumes and finds memory
    intact."""
    proc, port = _target_process(tmp_path)
    m, _ = launched(workload="random", dirty_pages_per_s=300)
    src = send_to("127.0.0.1", port, m, MigrationParams(max_iterations=4, timeout_s=30))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "0 bad" in out
    assert src.stats.status == "completed" and src.stats.bad_pages == 0
    assert src.stats.verified_pages > 0


def test_target_process_killed_mid_copy(tmp_path):
    """SIGKILL of the target mid-copy: the source cancels and its guest runs on unchanged."""
    proc, port = _target_process(tmp_path)
    m, _ = launched(workload="idle")
    before = memory_snapshot(m)

    def kill(ev):
        if ev["sent"] >= 256 and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(MigrationError) as e:
        send_to("127.0.0.1", port, m, MigrationParams(batch_pages=64, timeout_s=30),
                progress=kill)
    assert e.value.stats.status == "cancelled"
    assert_runs_on(m, before)


def test_no_target_listening_is_a_clear_error():
    """--to an address nobody listens on fails with a message naming it."""
    m, _ = launched(workload="idle")
    with pytest.raises(MigrationError, match="cannot reach the target"):
        send_to("127.0.0.1", 1, m)


def test_cli_migrate_writes_json_and_plot(tmp_path, capsys):
    """sevcore migrate prints the summary table and writes JSON with QEMU's names and a plot."""
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    rc = main(["migrate", "--path", "psp", "--mem", "2M", "--shared", "64K", "--quiet",
               "--dirty-rate", "100", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "total time" in out and "downtime" in out and "psp" in out
    d = json.loads(js.read_text())["psp"]
    for key in ("total-time", "setup-time", "downtime"):
        assert key in d
    for key in ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
                "dirty-pages-rate", "mbps", "dirty-sync-count", "pages-per-second",
                "precopy-bytes", "downtime-bytes"):
        assert key in d["ram"]
    assert d["status"] == "completed" and d["iterations"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_table_and_plot(tmp_path, capsys):
    """sevcore sweep runs each rate and writes a plot of total time and downtime."""
    png = tmp_path / "s.png"
    rc = main(["sweep", "--path", "psp", "--mem", "2M", "--shared", "64K", "--quiet",
               "--dirty-rates", "0,400", "--max-iterations", "3", "--plot", str(png),
               "--workers", "0", "--store", str(tmp_path / "store")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("psp") == 2
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv, msg", [
    (["migrate", "--set", "psp_bytes_per_second=1"], "did you mean psp_bytes_per_s"),
    (["migrate", "--mem", "3000"], "multiple of 4 KiB"),
    (["migrate", "--to", "nohostport", "--mem", "2M"], "HOST:PORT"),
    (["sweep", "--dirty-rates", "1,x"], "numbers"),
])
def test_cli_bad_arguments(argv, msg, capsys):
    """Bad arguments exit with a message naming the problem."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = str(e.value.code) + capsys.readouterr().err
    assert msg in err


def test_info_command_prints_the_cpu_report(capsys):
    """``sevcore info`` prints the CPU report of ``python -m sevcore.core.cpu``, with a forced
    tier when asked."""
    from sevcore.core import cpu  # only this test needs it

    assert main(["info"]) == 0
    assert capsys.readouterr().out.splitlines() == cpu.report()
    assert main(["info", "--tier", "portable"]) == 0
    assert "active:   portable" in capsys.readouterr().out
