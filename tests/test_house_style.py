"""The tests' own house style, checked on the source with ``ast``: every test function states the
behaviour it checks in a one-sentence docstring."""
import ast
import pathlib
import re

import pytest

TESTS = pathlib.Path(__file__).resolve().parent

#: A sentence ends at . ! or ? followed by a capital; abbreviations do not end one.
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bcf)(?<!\bvs)[.!?]\s+[A-Z]")


def undocumented(source):
    """``[(line, name, why)]`` for each test function of ``source`` that breaks the rule."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.name.startswith("test_"):
            doc = ast.get_docstring(node)
            if not doc:
                out.append((node.lineno, node.name, "no docstring"))
            elif SENTENCE_END.search(doc.strip()):
                out.append((node.lineno, node.name, "more than one sentence"))
    return out


def test_every_test_function_has_a_one_sentence_docstring():
    """No test function under tests/ lacks a docstring or spends more than one sentence on it."""
    bad = [f"{path.relative_to(TESTS)}:{line} {name}: {why}"
           for path in sorted(TESTS.rglob("test_*.py"))
           for line, name, why in undocumented(path.read_text())]
    assert bad == []


@pytest.mark.parametrize("source,why", [
    ("def test_a():\n    pass\n", "no docstring"),
    ("class TestX:\n    def test_a(self):\n        assert 1\n", "no docstring"),
    ('def test_a():\n    """It works. It also works."""\n', "more than one sentence"),
])
def test_the_check_finds_a_planted_violation(source, why):
    """A test without a docstring, or with two sentences in it, is reported."""
    assert [w for _, _, w in undocumented(source)] == [why]


def test_the_check_accepts_one_sentence_with_abbreviations():
    """One sentence with e.g. an abbreviation, a "3.5" or a trailing period passes."""
    assert undocumented('def test_a():\n    """A 3.5 KiB page, e.g. Shared, is EINVAL."""\n') == []
