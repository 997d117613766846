"""Coverage-guided fuzzing of the guest owner's readers of AMD sev-tool's files
(``sevcore.vmm.owner``): the certificate chain, the launch blob and TEK/TIK, the measurement,
the secret and the attestation report.

Contract: each reader returns its result or raises ValueError (CertChainError is one), whatever
the files hold; nothing else escapes. A folder of the files the project's own writers made (a
platform's chain, a launch session, a measurement, a secret and an ATTESTATION report of one
launch) passes every check.

Input: ``u8 operation``, then any number of ``u8 file, be16 length, bytes``: those files replace
the valid ones (by index into FILES) before the operation runs on the folder::

    0 validate_cert_chain   1 generate_launch_blob   2 LaunchSession.read
    3 calc_measurement_files   4 package_secret_files   5 validate_attestation

    python tests/fuzz/fuzz_owner.py -max_total_time=30
"""
import atexit
import functools
import os
import pathlib
import shutil
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["sevcore"]):
    from sevcore import uapi as U
    from sevcore.vmm import owner

import fuzzutil  # noqa: E402 -- this folder's, not instrumented

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support import psp as psputil  # noqa: E402 -- the firmware tests' launch helpers, found on the path above

FILES = (owner.PDH_FILENAME, owner.PEK_FILENAME, owner.OCA_FILENAME, owner.CEK_FILENAME,
         owner.ASK_FILENAME, owner.ARK_FILENAME, owner.GUEST_OWNER_DH_FILENAME,
         owner.LAUNCH_BLOB_FILENAME, owner.GUEST_TK_FILENAME, owner.CALC_MEASUREMENT_FILENAME,
         owner.SECRET_FILENAME, owner.ATTESTATION_REPORT_FILENAME)
POLICY = U.SEV_POLICY_MASK_NOKS
#: What each operation writes into the folder (of FILES).
WRITES = {1: (owner.GUEST_OWNER_DH_FILENAME, owner.LAUNCH_BLOB_FILENAME, owner.GUEST_TK_FILENAME),
          3: (owner.CALC_MEASUREMENT_FILENAME,)}
_ITEM = struct.Struct(">BH")
_on_disk = {}               # file name -> the bytes the folder holds, where known


def scratch_folder():
    """A folder of this process's own, named by the pid, in $SEVCORE_FUZZ_SCRATCH (run_fuzz.py's,
    which it removes), else in /dev/shm where there is one (a file rewrite there costs
    microseconds, not milliseconds). libFuzzer ends a run without Python's atexit handlers,
    so the folders of processes that are gone are removed here."""
    shm = "/dev/shm"
    parent = pathlib.Path(os.environ.get("SEVCORE_FUZZ_SCRATCH")
                          or (shm if os.path.isdir(shm) else tempfile.gettempdir()))
    for old in parent.glob("sevcore-fuzz-owner-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not pathlib.Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    folder = parent / f"sevcore-fuzz-owner-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    atexit.register(shutil.rmtree, folder, True)
    return str(folder)


@functools.cache
def launch():
    """One launch by the sev-tool flow (as tests/psp/test_psp_launch.py runs it), set up once:
    ``{file name: bytes}`` of the folder it leaves, and the measurement's inputs."""
    host = psputil.ready()
    psp = host.psp
    folder = scratch_folder()
    owner.write_cert_chain(folder, psp.export_cert_chain())
    rng = psputil._Rng(b"fuzz owner")
    session = owner.generate_launch_blob(folder, POLICY, rng)
    handle = psp.launch_start(POLICY, session.godh_cert, session.session)
    psp.activate(handle, psputil.SEV_ASID)
    image = rng(4096)
    spa = psputil.pages(host, 1)
    host.mem.write(spa, image)
    psp.launch_update_data(handle, spa, len(image))
    m = psp.launch_measure(handle)
    st = psp.platform_status()
    measure = (st.api_major, st.api_minor, st.build, POLICY, owner.launch_digest(image),
               m.mnonce)
    owner.calc_measurement_files(folder, *measure)
    with open(os.path.join(folder, owner.SECRET_FILENAME), "wb") as f:
        f.write(b"disk passphrase!")
    psp.launch_finish(handle)
    with open(os.path.join(folder, owner.ATTESTATION_REPORT_FILENAME), "wb") as f:
        f.write(psp.attestation_report(handle, b"\x11" * 16).raw)
    files = {}
    for name in FILES:
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    return {"folder": folder, "files": files, "measure": measure}


def pack(operation, files=()):
    """An input: ``operation`` with ``files`` (pairs of name and bytes) replacing the valid
    ones (make_corpus writes the seeds with it)."""
    return bytes([operation]) + b"".join(_ITEM.pack(FILES.index(name), len(data)) + data
                                         for name, data in files)


def unpack(data):
    """(operation, {name: bytes}) of an input."""
    files, off = {}, 1
    while off + _ITEM.size <= len(data):
        index, n = _ITEM.unpack_from(data, off)
        off += _ITEM.size
        files[FILES[index % len(FILES)]] = data[off:off + n]
        off += n
    return data[0] % 6, files


def run(operation, folder, measure):
    """The operation on ``folder``: its result."""
    rng = psputil._Rng(b"fuzz owner run")
    if operation == 0:
        return owner.validate_cert_chain(folder)
    if operation == 1:
        return owner.generate_launch_blob(folder, POLICY, rng)
    if operation == 2:
        return owner.LaunchSession.read(folder, POLICY)
    if operation == 3:
        return owner.calc_measurement_files(folder, *measure)
    if operation == 4:
        return owner.package_secret_files(folder, rng)
    return owner.validate_attestation(folder)


def TestOneInput(data):
    """One folder: the valid files with the input's in their place, and one reader on it."""
    if not data:
        return
    operation, files = unpack(data)
    base = launch()
    folder = base["folder"]
    for name in FILES:
        data = files.get(name, base["files"][name])
        if _on_disk.get(name) != data:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            _on_disk[name] = data
    try:
        result = run(operation, folder, base["measure"])
    except ValueError:
        assert any(files[n] != base["files"][n] for n in files), "the valid files are refused"
        return
    finally:
        for name in WRITES.get(operation, ()):
            _on_disk.pop(name, None)
    if all(files[n] == base["files"][n] for n in files) and operation == 5:
        assert result is True, "the valid attestation report does not verify"


if __name__ == "__main__":
    fuzzutil.main(TestOneInput, "owner")
