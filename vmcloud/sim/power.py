"""Host power models from SPECpower measurements: watts at 0%, 10%, ... 100% CPU, linear between."""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpecPowerModel:
    """Power as a function of CPU utilisation (0..1), from eleven measured points."""

    name: str
    watts: tuple[float, ...]

    def __post_init__(self):
        if len(self.watts) != 11:
            raise ValueError(f'power model {self.name} needs 11 points, got {len(self.watts)}')

    @property
    def idle(self) -> float:
        return self.watts[0]

    @property
    def max(self) -> float:
        return self.watts[-1]

    def power(self, utilization: float) -> float:
        """Watts at ``utilization``, interpolated between the 10% steps.

        :raises: ValueError outside [0, 1].
        """
        if utilization < 0 or utilization > 1:
            raise ValueError(f'utilization {utilization} is outside [0, 1]')
        return float(PowerTable([self]).at(np.zeros(1, dtype=np.int64),
                                           np.asarray([utilization], dtype=float))[0])

    def power_array(self, utilization: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`power`; values are clipped to [0, 1] first."""
        u = np.clip(np.asarray(utilization, dtype=float), 0.0, 1.0)
        return PowerTable([self]).at(np.zeros(len(u), dtype=np.int64), u)


class PowerTable:
    """Power models of many hosts (one row each), evaluated for many at once.

    The arithmetic is CloudSim's PowerModelSpecPower, operation for operation: the
    power-aware placement picks the smallest increase and ties go to the first host,
    so the last bit decides between hosts whose increases differ only by rounding.
    """

    def __init__(self, models):
        watts = np.array([m.watts for m in models], dtype=float)
        self.width = watts.shape[1]
        self.watts = watts.ravel()
        # (p2 - p1) / 10 for each 10% step, as CloudSim computes it; none past 100%
        self.steps = np.hstack([np.diff(watts, axis=1) / 10,
                                np.zeros((len(watts), 1))]).ravel()

    def at(self, rows: np.ndarray, utilization: np.ndarray) -> np.ndarray:
        """Watts of model ``rows[i]`` at ``utilization[i]`` (in [0, 1])."""
        u10 = utilization * 10
        low = u10.astype(np.int64)
        i = rows * self.width + low
        # on a 10% point CloudSim's floor and ceil agree: its step is 0, not the next one
        step = np.where(u10 == low, 0.0, self.steps[i])
        return self.watts[i] + step * (utilization - low / 10) * 100


# HP ProLiant ML110 G4 (1 x Xeon 3040 1860 MHz, 2 cores, 4 GB): SPECpower_ssj2008 2011-01-27.
HP_PROLIANT_ML110_G4 = SpecPowerModel(
    'hp-proliant-ml110-g4', (86, 89.4, 92.6, 96, 99.5, 102, 106, 108, 112, 114, 117))
# HP ProLiant ML110 G5 (1 x Xeon 3075 2660 MHz, 2 cores, 4 GB): SPECpower_ssj2008 2011-01-24.
HP_PROLIANT_ML110_G5 = SpecPowerModel(
    'hp-proliant-ml110-g5', (93.7, 97, 101, 105, 110, 116, 121, 125, 129, 133, 135))

MODELS = {m.name: m for m in (HP_PROLIANT_ML110_G4, HP_PROLIANT_ML110_G5)}
