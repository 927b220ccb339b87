# Stub for the compiled module fastbn._overlap (fastbn/_overlap.pyx).
from collections.abc import Iterable

import numpy as np

def shared_with(a: np.ndarray, others: Iterable[np.ndarray | None]) -> list[int]: ...
