"""``sevcore evacuate``: one line and status 2 for bad input, and a report (table, JSON, plot)
for a small evacuation."""
import json

import pytest

from sevcore.cli import main, parse_link


@pytest.mark.parametrize("argv, words", [
    (["--guests", "0"], "must be >= 1"),
    (["--guests", "two"], "not a whole number"),
    (["--mem", "5"], "multiple of 4 KiB"),
    (["--link", "fast"], "not a link speed"),
    (["--link", "0G"], "must be > 0"),
    (["--parallel", "0"], "must be >= 1"),
    (["--sequential", "--parallel", "2"], "not allowed with"),
    (["--targets", "-1"], "must be >= 1"),
    (["--path", "both", "--mem", "1M", "--shared", "64K"], "no room for the helper"),
    (["--set", "psp_bytes_per_s=0"], "must be > 0"),
    (["--set", "no_such=1"], "unknown cost-model parameter"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, words):
    """Each bad argument is refused before anything runs: one line on stderr, status 2."""
    with pytest.raises(SystemExit) as e:
        main(["evacuate", *argv])
    err = capsys.readouterr()
    assert e.value.code == 2
    assert err.out == "" and len(err.err.strip().splitlines()) == 1 and words in err.err


def test_plot_without_matplotlib_is_refused_before_anything_runs(capsys, monkeypatch, tmp_path):
    """--plot with matplotlib missing is one line and status 2 before any guest launches."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # import fails as if absent
    with pytest.raises(SystemExit) as e:
        main(["evacuate", "--guests", "64", "--mem", "64M", "--plot", str(tmp_path / "e.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.png").exists()


def test_link_speeds_are_bits_per_second():
    """'10G' is 10 Gbit/s, i.e. 1.25e9 bytes/s; a plain number is bit/s too."""
    assert parse_link("10G") == 1.25e9
    assert parse_link("800M") == 1e8
    assert parse_link("8000") == 1000


def test_small_evacuation_reports_every_guest_and_the_whole(tmp_path, capsys):
    """Two guests by both paths: a table per path, JSON with every guest's check and the
    evacuation's figures, a plot, and status 0."""
    out, png = tmp_path / "evac.json", tmp_path / "evac.png"
    rc = main(["evacuate", "--guests", "2", "--mem", "2M", "--shared", "64K", "--path", "both",
               "--link", "10G", "--parallel", "2", "--json", str(out), "--plot", str(png),
               "--progress"])
    text = capsys.readouterr()
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep) == {"psp", "helper"}
    for path, r in rep.items():
        assert [g["name"] for g in r["guests"]] == ["guest0", "guest1"]
        assert all(g["ok"] for g in r["guests"])
        ev = r["evacuation"]
        assert ev["all_ok"] and ev["path"] == path and ev["evacuation_s"] > 0
        assert set(ev["hosts"]) == {"source", "target0"}
        assert f"== {path} path" in text.out
    assert "bottleneck:" in text.out and "guest1: completed" in text.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
