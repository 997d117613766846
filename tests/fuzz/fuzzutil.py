"""How the fuzz harnesses run under libFuzzer (atheris), and the flags they share."""
import pathlib
import sys
import tempfile

import atheris

HERE = pathlib.Path(__file__).resolve().parent
#: libFuzzer flags a harness runs with unless the command line gives them: keep every seed (a
#: valid certificate or stream covers no more code than a shorter input, yet it is what
#: mutations of deep fields start from), and report an input that runs 10 s as a hang.
DEFAULT_FLAGS = ("-keep_seed=1", "-timeout=10")


def main(test_one_input, harness, argv=None):
    """Fuzz ``test_one_input`` with the libFuzzer command line ``argv`` (default sys.argv).
    Without corpus folders on it, the harness's committed seeds are read and what the run finds
    is kept in ``$TMPDIR/sevcore-fuzz/<harness>`` (libFuzzer writes into the first folder; the
    committed seed corpus stays as make_corpus.py wrote it)."""
    argv = list(sys.argv if argv is None else argv)
    given = {a.split("=")[0] for a in argv[1:] if a.startswith("-")}
    argv += [f for f in DEFAULT_FLAGS if f.split("=")[0] not in given]
    if not any(not a.startswith("-") for a in argv[1:]):
        found = pathlib.Path(tempfile.gettempdir()) / "sevcore-fuzz" / harness
        found.mkdir(parents=True, exist_ok=True)
        argv += [str(found), str(HERE / "corpus" / harness)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
