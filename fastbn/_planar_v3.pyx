# The planar kernels again, compiled for x86-64-v3 (AVX2, FMA, BMI1/2, F16C,
# LZCNT, MOVBE): setup.py builds this module with -march=x86-64-v3 and
# fastbn._dispatch uses it when the CPU has every feature of that level.
# One source: the text is _planar.pyx.

include "_planar.pyx"
