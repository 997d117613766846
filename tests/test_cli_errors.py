"""Bad input to the ``sevcore`` command, through its real entry point (``python -m sevcore``):
one line naming the problem, exit status 2, nothing written."""
import subprocess
import sys

import pytest

from sevcore.cli import main

CASES = [
    ("migrate --mem 1T --json out.json", "--mem"),
    ("migrate --vcpus 100000 --json out.json", "--vcpus"),
    ("migrate --vcpus 0", "--vcpus"),
    ("migrate --mem 3000", "--mem"),
    ("migrate --mem lots", "--mem"),
    ("migrate --shared 1G --mem 64M", "--shared"),
    ("migrate --dirty-rate -5", "--dirty-rate"),
    ("migrate --dirty-rate nan", "--dirty-rate"),
    ("migrate --hot-fraction 2", "--hot-fraction"),
    ("migrate --max-iterations 0", "--max-iterations"),
    ("migrate --policy zz", "--policy"),
    ("migrate --policy 0x100000000", "--policy"),
    ("migrate --workload nope", "--workload"),
    ("migrate --path nope", "--path"),
    ("migrate --set bogus=1", "bogus"),
    ("migrate --listen 70000", "--listen"),
    ("migrate --to nohost", "--to"),
    ("migrate --json {tmp}/no/such/dir/out.json", "--json"),
    ("migrate --port-file {tmp}/no/such/dir/port --listen 0", "--port-file"),
    ("migrate --bogus", "--bogus"),
    ("migrate --type snp --path psp", "--path ma"),
    ("migrate --type snp --path ma --mem 2G", "--mem"),
    ("migrate --type snp --path ma --max-iterations 0", "--max-iterations"),
    ("migrate --type snp --path ma --to nohost", "--to"),
    ("migrate --type snp --path ma --listen 70000", "--listen"),
    ("sweep --type snp", "--type snp"),
    ("sweep --path ma", "not 'ma'"),
    ("sweep --dirty-rates a,b --json out.json", "dirty-rate"),
    ("sweep --dirty-rates 0,-1", "--dirty-rate"),
    ("sweep --mem 1T", "--mem"),
    ("sweep --vcpus 100000", "--vcpus"),
    ("info --tier bogus", "bogus"),
]


SUBPROCESS = {"migrate --mem 1T --json out.json", "migrate --vcpus 100000 --json out.json",
              "sweep --dirty-rates a,b --json out.json", "info --tier bogus"}


def run(argv, tmp_path, monkeypatch, capsys):
    """``(status, stdout, stderr)`` of ``sevcore argv`` in ``tmp_path``: a few cases as a new
    process (``python -m sevcore``), the others through the same ``main`` in this one."""
    if argv in SUBPROCESS:
        proc = subprocess.run([sys.executable, "-m", "sevcore", *argv.split()], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv.format(tmp=tmp_path).split())
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_status_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, argv,
                                                           names):
    """Each bad option makes ``sevcore`` print one line naming it on stderr and nothing on
    stdout, exit with status 2 before doing any work, and create no file."""
    if not argv.startswith("info") and "--json" not in argv:
        argv += " --json out.json"
    status, out, err = run(argv, tmp_path, monkeypatch, capsys)
    lines = err.splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("sevcore") and names in lines[0], lines
    assert out == "" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
