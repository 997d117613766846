"""The README's Python examples run as written, so the front page cannot rot.

Every ```python block of README.md is one test. The README reads as one session (the SEV-ES
example uses the ``kvm`` and the uapi names of the tour above it), so the blocks run in order in
one namespace: a block's test first runs the blocks above it that have not run yet, and a
failure names the README line. The migration example is sized to take about a second.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text):
    """``[(line, source)]``: each fenced ```python block and the README line its code starts on."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        blocks.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())


class Session:
    """The README's namespace, with the blocks run into it so far."""

    def __init__(self):
        self.ns = {"__name__": "readme"}
        self.done = 0
        self.failed = None

    def run(self, i):
        """Run blocks up to and including ``i``."""
        while self.done <= i:
            if self.failed is not None:
                pytest.fail(f"the example at README.md line {self.failed} failed first")
            line, source = BLOCKS[self.done]
            self.done += 1
            self.failed = line
            # Padding keeps tracebacks on README.md's own line numbers.
            exec(compile("\n" * (line - 1) + source, str(README), "exec"), self.ns)
            self.failed = None


@pytest.fixture(scope="module")
def session():
    return Session()


def test_every_python_fence_is_collected():
    """Every fence that opens Python code (```py, ```python, ...) is one of the collected examples."""
    fences = re.findall(r"^```py", README.read_text(), re.M)
    assert BLOCKS and len(fences) == len(BLOCKS)


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_example_runs(session, i):
    """The example runs without error after the examples above it, its asserts included."""
    session.run(i)
