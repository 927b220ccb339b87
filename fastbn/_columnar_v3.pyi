# Stub for fastbn._columnar_v3: the functions of fastbn._planar (one stub source;
# compile_args is the planar modules' only).
from fastbn._planar import apply as apply
from fastbn._planar import backward as backward
from fastbn._planar import forward_train as forward_train
from fastbn._planar import inference as inference
from fastbn._planar import sums as sums
