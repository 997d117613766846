"""How the fuzz harnesses run under libFuzzer (atheris), and the flags they share."""
import sys

import atheris

#: libFuzzer flags a harness runs with unless the command line gives them: keep every seed (a
#: valid certificate or stream covers no more code than a shorter input, yet it is what
#: mutations of deep fields start from), and report an input that runs 10 s as a hang.
DEFAULT_FLAGS = ("-keep_seed=1", "-timeout=10")


def main(test_one_input, argv=None):
    """Fuzz ``test_one_input`` with the libFuzzer command line ``argv`` (default sys.argv)."""
    argv = list(sys.argv if argv is None else argv)
    given = {a.split("=")[0] for a in argv[1:] if a.startswith("-")}
    argv += [f for f in DEFAULT_FLAGS if f.split("=")[0] not in given]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
