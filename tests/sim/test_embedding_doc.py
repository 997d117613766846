"""docs/embedding.md's examples run as written, in order, in one namespace."""
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "embedding.md"


def test_the_embedding_examples_run(capsys):
    """Both ```python blocks run; the two migrations complete with no bad page and the
    recording driver saw the batches."""
    text = DOC.read_text()
    ns = {"__name__": "embedding"}
    blocks = list(re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M))
    assert len(blocks) == 2 and len(re.findall(r"^```py", text, re.M)) == 2
    for m in blocks:
        line = text.count("\n", 0, m.start(1))
        exec(compile("\n" * line + m.group(1), str(DOC), "exec"), ns)
    out = capsys.readouterr().out
    assert out.count("completed") == 3 and "bad" in out
    assert all(p.value.stats.bad_pages == 0 for p in ns["procs"])
    assert ns["r"].stats.bad_pages == 0 and len(ns["drv"].log) > 2
    assert sum(1 for line in out.splitlines() if line.endswith("]")) >= 2     # the monitor
