# The planar kernels again, compiled for x86-64-v4 (AVX-512F/BW/CD/DQ/VL):
# setup.py builds this module with -march=x86-64-v4 and fastbn._dispatch
# uses it when the CPU has every feature of that level. One source: the
# text is _planar.pyx.

include "_planar.pyx"
