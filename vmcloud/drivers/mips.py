"""A host described in MIPS: its processing elements (PEs), their speed and its RAM.

The sim driver runs on one; the simulator (vmcloud.sim.model) extends it with
bandwidth and a power model. It lives here, below both, because a driver must not
import the simulator: the simulator is built on the layers below it, drivers among
them, and takes its host type from here.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class MipsHost:
    name: str
    pes: int
    pe_mips: float
    ram_mb: int

    @property
    def mips(self) -> float:
        return self.pes * self.pe_mips


# HP ProLiant ML110 G5: 2 x 2660 MIPS, 4 GiB (the simulator's HOST_TYPES[1]).
ML110_G5 = MipsHost('ml110-g5', 2, 2660, 4096)
