"""Write the fuzz harnesses' seed corpora (tests/fuzz/corpus/<harness>/) from the project's own
writers: streams from StreamWriter, packets sealed by the PSP's SEND_UPDATE_DATA, and sev-tool
files written by ``sevcore.vmm.owner``. Deterministic (fixed seeds), so a rerun rewrites the
same files; run it after a format change and commit the result.

    python tests/fuzz/make_corpus.py
"""
import pathlib

import numpy as np

import fuzz_owner
import fuzz_packets
import fuzz_stream
from sevcore.core import sevpkt
from sevcore.migration import stream as S
from sevcore.vmm import owner as O

HERE = pathlib.Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


def stream_seeds():
    """{name: input} for fuzz_stream: an option byte, then a stream a StreamWriter wrote."""
    rng = np.random.default_rng(18)

    def stream(write, flags=S.FLAG_ENCRYPTED):
        sink = fuzz_stream.Sink()
        w = S.StreamWriter(sink, flags)
        write(w)
        w.end()
        return bytes(sink.data)

    def every_record(w):
        w.setup({"kind": "migrate", "params": {"path": "psp", "vcpus": [0, 1]}})
        w.sev_session(5, rng.bytes(64), rng.bytes(128))
        w.iteration(0, 3)
        w.encrypted_page(0x100, rng.bytes(52), rng.bytes(32))
        w.shared_page(0x200, rng.bytes(S.PAGE_SIZE))
        w.zero_pages(0x300, 16)
        w.helper_page(0x400, 7, rng.bytes(44))
        w.encrypted_batch([0x500, 0x501], rng.bytes(2 * 52), rng.bytes(2 * 32))
        w.helper_batch([0x700, 0x701], [9, 10], rng.bytes(2 * 44))
        w.iteration(1, 1, stop=True)
        w.vcpu_state(0, rng.bytes(64))

    def batches(w):
        w.encrypted_batch(np.arange(3), rng.bytes(3 * 52), rng.bytes(3 * 16))
        w.shared_batch([1, 2], rng.bytes(2 * S.PAGE_SIZE))
        w.helper_batch([3], [4], rng.bytes(20))

    def small(w):
        w.setup({"kind": "complete"})
        w.zero_pages(0, 1)
        w.iteration(2, 0)

    seeds = {"every-record": stream(every_record), "batches": stream(batches),
             "small": stream(small, S.FLAG_ENCRYPTED | S.FLAG_HELPER)}
    fix = fuzz_stream.FIX_CRCS
    out = {f"{name}-fix-crcs": bytes([fix]) + blob for name, blob in seeds.items()}
    out["every-record-raw"] = bytes([0]) + seeds["every-record"]
    out["small-buffer-small-reads"] = bytes([3 | 3 << 2]) + seeds["small"]
    out["batches-reuse-7-byte-reads"] = bytes([fix | 1 << 4 | 2 << 2]) + seeds["batches"]
    return out


def packet_seeds():
    """{name: input} for fuzz_packets: packets sealed by the packet kernel under the harness's
    keys, and packets of the PSP's own SEND_UPDATE_DATA for the harness's target."""
    P = fuzz_packets
    rng = np.random.default_rng(19)
    ivs, pt, measure = rng.bytes(2 * 16), rng.bytes(2 * 32), rng.bytes(sevpkt.MEASURE_SIZE)
    hdrs, ct = (bytes(x) for x in sevpkt.seal(P.TEK, P.TIK, pt, ivs))
    shdrs, sct = (bytes(x) for x in sevpkt.seal(P.TEK, P.TIK, pt[:32], ivs[:16],
                                                 sevpkt.CTX_SECRET, measure=measure))
    src = P.target()["src"]
    page = src.psp.send_update_data(src.handle, src.spa, 4096)
    small = src.psp.send_update_data(src.handle, src.spa + 64, 32)
    rows, trans = (bytes(x) for x in src.psp.send_update_data_pages(
        src.handle, [src.spa, src.spa + 4096]))
    long_rows = rows[:52] + bytes(8) + rows[52:] + bytes(8)    # hdr_len 60: what a record may say
    return {
        "kernel": P.pack(0, header=hdrs, ciphertext=ct),
        "kernel-rows-in-place": P.pack(0, P.ROWS | 1 << 2, header=hdrs, ciphertext=ct),
        "kernel-out-set-mac": P.pack(0, P.SET_MAC | 2 << 2, header=hdrs, ciphertext=ct),
        "kernel-measure": P.pack(0, ctx=sevpkt.CTX_SECRET, header=shdrs, measure=measure,
                                 ciphertext=sct),
        "secret": P.pack(1, header=shdrs, measure=measure, ciphertext=sct),
        "receive-page": P.pack(2, guest_len=4096, trans_len=4096, header=page.header,
                               ciphertext=page.ciphertext),
        "receive-32": P.pack(2, guest_len=32, trans_len=32, offset=16, header=small.header,
                             ciphertext=small.ciphertext),
        "receive-32-set-mac": P.pack(2, P.SET_MAC, guest_len=32, trans_len=32,
                                     header=small.header, ciphertext=small.ciphertext),
        "pages": P.pack(3, 1 << 4, hdr_len=52, trans_len=4096, offset=0b0100, header=rows,
                        ciphertext=trans),
        "pages-hdr-len-60-set-mac": P.pack(3, P.SET_MAC | 1 << 4, hdr_len=60, trans_len=4096,
                                           offset=0b1011, header=long_rows, ciphertext=trans),
    }


def owner_seeds():
    """{name: input} for fuzz_owner: each operation with the files it reads, as the project's
    writers made them in one launch (the harness's own set-up)."""
    files = fuzz_owner.launch()["files"]
    reads = {0: (O.PDH_FILENAME, O.PEK_FILENAME, O.OCA_FILENAME, O.CEK_FILENAME,
                 O.ASK_FILENAME, O.ARK_FILENAME),
             1: (O.PDH_FILENAME,),
             2: (O.GUEST_TK_FILENAME, O.GUEST_OWNER_DH_FILENAME, O.LAUNCH_BLOB_FILENAME),
             3: (O.GUEST_TK_FILENAME,),
             4: (O.GUEST_TK_FILENAME, O.PEK_FILENAME, O.SECRET_FILENAME,
                 O.CALC_MEASUREMENT_FILENAME),
             5: (O.ATTESTATION_REPORT_FILENAME, O.PEK_FILENAME)}
    out = {}
    for op, names in reads.items():
        out[f"op{op}"] = fuzz_owner.pack(op)
        for name in names:
            out[f"op{op}-{name}"] = fuzz_owner.pack(op, [(name, files[name])])
    return out


def write(harness, seeds):
    folder = CORPUS / harness
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for name, data in seeds.items():
        (folder / name).write_bytes(data)
    print(f"{folder.relative_to(HERE.parents[1])}: {len(seeds)} seeds, "
          f"{sum(map(len, seeds.values()))} bytes")


def main():
    write("stream", stream_seeds())
    write("packets", packet_seeds())
    write("owner", owner_seeds())


if __name__ == "__main__":
    main()
