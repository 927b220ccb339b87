# Stub for fastbn._columnar_v3: the same functions as fastbn._columnar (one source).
from fastbn._columnar import *  # noqa: F403
