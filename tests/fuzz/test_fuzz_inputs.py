"""The fuzz harnesses' seed corpora and every input that once broke a parser
(tests/fuzz/regressions) hold their harness's contract; run_fuzz.py runs each harness for a
bounded time (the CI fuzz stage)."""
import pathlib

import pytest

import fuzz_owner
import fuzz_packets
import fuzz_stream
import run_fuzz

HERE = pathlib.Path(__file__).resolve().parent
HARNESSES = {"stream": fuzz_stream, "packets": fuzz_packets, "owner": fuzz_owner}


def saved_inputs():
    for kind in ("corpus", "regressions"):
        for harness in HARNESSES:
            folder = HERE / kind / harness
            for path in sorted(folder.iterdir()) if folder.is_dir() else ():
                yield pytest.param(harness, path, id=f"{kind}/{harness}/{path.name}")


@pytest.mark.parametrize("harness, path", list(saved_inputs()))
def test_saved_input_holds_the_contract(harness, path):
    """A seed, or an input that once broke its parser, runs through its harness cleanly."""
    HARNESSES[harness].TestOneInput(path.read_bytes())


def test_every_harness_has_seeds_and_a_ci_run():
    """Each fuzz_*.py has a seed corpus and is one of the harnesses CI runs."""
    found = {p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py")}
    assert found == set(HARNESSES) == set(run_fuzz.HARNESSES)
    assert all(any((HERE / "corpus" / h).iterdir()) for h in found)
