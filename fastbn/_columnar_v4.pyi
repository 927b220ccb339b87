# Stub for fastbn._columnar_v4: the functions of fastbn._planar (one stub source;
# compile_args is the planar modules' only).
from fastbn._planar import apply as apply
from fastbn._planar import ENTRY as ENTRY
from fastbn._planar import sums as sums
