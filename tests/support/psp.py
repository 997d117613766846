"""Helpers of the firmware tests: a Host whose PSP is ready, raw mailbox commands, launched
guests and snapshots of everything a refused command must leave unchanged."""

import sevcore
from sevcore.vmm import owner
from sevcore import uapi as U


SEV_ASID = 200          # in [min_sev_asid, max_sev_asid] = [100, 509]
ES_ASID = 5             # in [1, min_sev_asid)
TMR_SIZE = 1 << 20


def pages(host, n):
    """``n`` contiguous fresh host pages; their SPA."""
    pfns = host.mem.alloc(n)
    assert all(int(b) - int(a) == 1 for a, b in zip(pfns, pfns[1:]))
    return int(pfns[0]) << 12


def ready(seed=11, es=False, **psp_args):
    """A Host whose firmware is INIT'd, WBINVD'd and DF_FLUSHed, as the kernel leaves it."""
    host = sevcore.Host(seed=seed)
    if psp_args:
        host.psp = type(host.psp)(host, **psp_args)
    if es:
        base = pages(host, 512)
        tmr = (base + TMR_SIZE - 1) & ~(TMR_SIZE - 1)
        pages(host, 256)
        host.psp.init(flags=U.SEV_INIT_FLAGS_SEV_ES, tmr_address=tmr, tmr_len=TMR_SIZE)
    else:
        host.psp.init()
    host.psp.wbinvd()
    host.psp.df_flush()
    return host


def raw(host, cmd, layout=None, **fields):
    """Issue ``cmd`` through the mailbox with a buffer built from ``fields``; returns (status,
    the buffer's fields after the command as a dict)."""
    spa = getattr(host, "_raw_buf", None)
    if spa is None:
        spa = host._raw_buf = pages(host, 1)
    if layout is None:
        return host.psp.command(cmd, 0), {}
    host.mem.write(spa, layout.pack(**fields))
    status = host.psp.command(cmd, spa)
    return status, layout.unpack(host.mem.read(spa, layout.size))


def blob(host, data):
    """Put ``data`` in fresh host pages; returns its SPA."""
    spa = pages(host, max(1, (len(data) + 4095) // 4096))
    host.mem.write(spa, data)
    return spa


def snapshot(host, *spans):
    """Everything a failed command must leave unchanged: platform, guests, ASIDs, keys, memory."""
    psp = host.psp
    guests = tuple(sorted((h, g.state, g.asid, g.active, g.pending, g.tek, g.tik, g.measure,
                           g.sha.digest()) for h, g in psp._guests.items()))
    keys = tuple(sorted(host.umc._engines))
    return (psp.state, psp.config_flags, guests, bytes(psp._asid_state), keys,
            tuple(host.mem.read(s, n) for s, n in spans))


class Launched:
    """A guest launched with a guest-owner session, with what the tests need to know about it."""

    def __init__(self, host, policy=0, asid=SEV_ASID, npages=2, measure=False, finish=False,
                 seed=b"owner"):
        self.host, self.psp, self.policy, self.asid = host, host.psp, policy, asid
        rng = _Rng(seed)
        self.session = owner.create_launch_session(host.psp.pdh_cert_export().pdh_cert, policy,
                                                   rng)
        self.handle = self.psp.launch_start(policy, self.session.godh_cert, self.session.session)
        self.psp.activate(self.handle, asid)
        self.spa = pages(host, npages)
        self.data = rng(npages * 4096)
        host.mem.write(self.spa, self.data)
        self.psp.launch_update_data(self.handle, self.spa, len(self.data))
        self.measure = None
        if measure or finish:
            self.measure = self.psp.launch_measure(self.handle)
        if finish:
            self.psp.launch_finish(self.handle)


class _Rng:
    """A deterministic rng(n) for the owner tools."""

    def __init__(self, seed):
        from sevcore.psp.crypto import Drbg
        self._d = Drbg(seed, b"test owner")

    def __call__(self, n):
        return self._d(n)


def migration_pair(policy=0, npages=2, src_seed=21, dst_seed=22):
    """A RUNNING guest on one host, SEND_START towards another, RECEIVE_START there; returns
    (source Launched, destination host, destination handle, SendStart)."""
    src = Launched(ready(src_seed), policy=policy, npages=npages, finish=True)
    dst = ready(dst_seed)
    chain = dst.psp.export_cert_chain()
    start = src.psp.send_start(src.handle, chain.pdh, chain.plat_certs, chain.amd_certs)
    handle = dst.psp.receive_start(start.policy, src.psp.pdh_cert_export().pdh_cert,
                                   start.session)
    dst.psp.activate(handle, SEV_ASID)
    return src, dst, handle, start
