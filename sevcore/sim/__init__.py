"""sevcore's migrations and launches as processes of a SimPy environment (docs/embedding.md).

``env.process(sevcore.sim.migrate(env, machine, target_kvm, params, psp=psps, link=link))``
migrates for real (firmware, helper, stream, the guest's check) while SimPy keeps the time:
each Host's PSP is a :class:`Psp` (one command at a time, first come first served), a
:class:`Link` is shared fairly among the transfers on it, and several migrations in one
environment interleave on them. Needs SimPy (``pip install 'sevcore[sim]'``).
"""
try:
    import simpy  # noqa: F401  (fail here, with the way out, rather than deep inside)
except ImportError as e:                     # pragma: no cover - the optional extra is missing
    raise ImportError("sevcore.sim needs SimPy: pip install 'sevcore[sim]'") from e

from sevcore.sim.driver import Cancelled, SimDriver
from sevcore.sim.process import Migration, launch
from sevcore.sim.process import migrate_process as migrate
from sevcore.sim.resources import Link, Psp, Psps

__all__ = ["Cancelled", "Link", "Migration", "Psp", "Psps", "SimDriver", "launch", "migrate"]
