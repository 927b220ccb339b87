# The planar kernels again, compiled for x86-64-v3 (AVX2 and FMA): setup.py
# builds this module with -march=x86-64-v3 and fastbn.functional uses it
# when the CPU has those instructions. One source: the text is _planar.pyx.

include "_planar.pyx"
