"""Migration between two processes over TCP, a target killed mid-copy, and the sevcore command."""
import json
import os
import signal

import pytest

from sevcore.cli import main
from sevcore.migration.engine import MigrationError, MigrationParams
from sevcore.migration.machine import Machine
from sevcore.migration.remote import send_to

from support.migration import assert_runs_on, launched, memory_snapshot, target_process


def test_two_processes_over_tcp(tmp_path):
    """A target process receives the guest over TCP; its guest resumes and finds memory
    intact."""
    proc, port = target_process(tmp_path)
    m, _ = launched(workload="random", dirty_pages_per_s=300)
    src = send_to("127.0.0.1", port, m, MigrationParams(max_iterations=4, timeout_s=30))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "0 bad" in out
    assert src.stats.status == "completed" and src.stats.bad_pages == 0
    assert src.stats.verified_pages > 0


def test_target_process_killed_mid_copy(tmp_path):
    """SIGKILL of the target mid-copy: the source cancels and its guest runs on unchanged."""
    proc, port = target_process(tmp_path)
    m, _ = launched(workload="idle")
    before = memory_snapshot(m)

    def kill(ev):
        if ev["sent"] >= 256 and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(MigrationError) as e:
        send_to("127.0.0.1", port, m, MigrationParams(batch_pages=64, timeout_s=30),
                progress=kill)
    assert e.value.stats.status == "failed" and e.value.stats.send_cancel
    assert_runs_on(m, before)


def test_killed_target_leaves_a_failed_record_with_the_source_guest_checked(tmp_path,
                                                                             monkeypatch):
    """``sevcore migrate --to ... --json`` against a target killed mid-copy writes QEMU's
    failed record: status, error-desc, the statistics so far and the source guest's own
    check after SEND_CANCEL."""
    import sevcore.cli as cli  # the progress bar is the hook that kills the target
    proc, port = target_process(tmp_path)

    class Killer(cli.Progress):
        def __call__(self, ev):
            if ev["sent"] >= 256 and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    monkeypatch.setattr(cli, "Progress", Killer)
    js = tmp_path / "f.json"
    rc = main(["migrate", "--to", f"127.0.0.1:{port}", "--path", "psp", "--mem", "4M",
               "--shared", "64K", "--workload", "idle", "--quiet", "--json", str(js)])
    assert rc == 1
    d = json.loads(js.read_text())["psp"]
    assert d["status"] == "failed" and d["error-desc"].split(":")[0] in (
        "PeerClosed", "StreamTruncated", "TargetFailed")
    assert d["ram"]["transferred"] > 256 * 4096
    g = d["source-guest"]
    assert g["resumed"] is True and g["send-cancel"] is True
    assert g["check"]["bad"] == 0 and g["check"]["checked"] > 0


def test_postcopy_target_process_survives_a_cut_and_resumes(tmp_path, monkeypatch):
    """A ``--listen --resume`` target process: the source's socket is shut mid post-copy, the
    source connects again, and the target's guest finishes with its check clean."""
    import socket  # only this test shuts a socket down
    from sevcore.migration import remote
    proc, port = target_process(tmp_path, "--resume")
    chans = []
    connect = remote.tcp_connect
    monkeypatch.setattr(remote, "tcp_connect",
                        lambda *a, **k: chans.append(connect(*a, **k)) or chans[-1])

    def cut(ev):
        if ev["phase"] == "postcopy" and ev["sent"] >= 64 and len(chans) == 1:
            chans[0].sock.shutdown(socket.SHUT_RDWR)
    m, _ = launched(workload="random", dirty_pages_per_s=2_000, mem_size=4 << 20)
    src = send_to("127.0.0.1", port, m, MigrationParams(postcopy=True, postcopy_after=0,
                                                        batch_pages=64, timeout_s=30),
                  progress=cut, resume=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "0 bad" in out and len(chans) == 2
    assert src.stats.status == "completed" and src.stats.postcopy_resumes == 1


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


def test_cli_migrate_with_dirty_rings(tmp_path, capsys, monkeypatch):
    """sevcore migrate --dirty-ring gives the source's vCPUs dirty rings and completes with the
    guest intact."""
    launches = []
    real = Machine.launch

    def spy(kvm, config, dirty_ring_size=0):
        launches.append(dirty_ring_size)
        return real(kvm, config, dirty_ring_size)
    monkeypatch.setattr(Machine, "launch", staticmethod(spy))
    js = tmp_path / "m.json"
    rc = main(["migrate", "--path", "psp", "--mem", "2M", "--shared", "64K", "--quiet",
               "--dirty-rate", "2000", "--dirty-ring", "--max-iterations", "3", "--json",
               str(js)])
    assert rc == 0 and launches == [4096 * 16]
    d = json.loads(js.read_text())["psp"]
    assert d["status"] == "completed" and d["sev"]["bad-pages"] == 0


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


def test_cli_postcopy_json_and_sweep_comparison(tmp_path, capsys):
    """sevcore migrate --postcopy writes QEMU's post-copy keys; sevcore sweep --grid
    postcopy=no,yes runs each rate both ways."""
    js = tmp_path / "p.json"
    rc = main(["migrate", "--path", "helper", "--mem", "4M", "--shared", "64K", "--quiet",
               "--postcopy", "--postcopy-after", "0", "--dirty-rate", "2000", "--json", str(js)])
    assert rc == 0
    d = json.loads(js.read_text())["helper"]
    assert d["status"] == "completed" and d["sev"]["bad-pages"] == 0
    assert d["ram"]["postcopy-requests"] > 0 and d["postcopy-vcpu-blocktime"][0] > 0
    assert "postcopy blocktime" in capsys.readouterr().out
    sj = tmp_path / "s.json"
    rc = main(["sweep", "--path", "psp", "--mem", "2M", "--shared", "64K", "--quiet",
               "--dirty-rates", "400", "--max-iterations", "2", "--grid", "postcopy=no,yes",
               "--workers", "0", "--store", str(tmp_path / "store"), "--json", str(sj)])
    assert rc == 0
    rows = json.loads(sj.read_text())
    assert [r["postcopy"] for r in rows] == [False, True]


@pytest.mark.parametrize("argv, msg", [
    (["migrate", "--set", "psp_bytes_per_second=1"], "did you mean psp_bytes_per_s"),
    (["migrate", "--mem", "3000"], "multiple of 4 KiB"),
    (["migrate", "--to", "nohostport", "--mem", "2M"], "HOST:PORT"),
    (["sweep", "--dirty-rates", "1,x"], "numbers"),
    (["migrate", "--postcopy", "--postcopy-after", "-1", "--mem", "2M"], "postcopy_after"),
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
