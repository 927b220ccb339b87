"""Which x86-64 micro-architecture levels this CPU supports.

The check is the compiler's own (``__builtin_cpu_supports`` with the level
names of GCC >= 12 and Clang >= 16): a level is reported only when the CPU
has every feature that ``-march=x86-64-vN`` lets the compiler use (v3: AVX,
AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE and v2's; v4: AVX512F,
AVX512BW, AVX512CD, AVX512DQ, AVX512VL and v3's) and the operating system
saves the wide registers. Other compilers and other CPUs report no level.
"""

cdef extern from *:
    """
    #if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 16) || \\
                                (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12))
    static int fastbn_cpu_level(int level)
    {
        __builtin_cpu_init();
        switch (level) {
        case 2: return __builtin_cpu_supports("x86-64-v2") != 0;
        case 3: return __builtin_cpu_supports("x86-64-v3") != 0;
        case 4: return __builtin_cpu_supports("x86-64-v4") != 0;
        }
        return 0;
    }
    #else
    static int fastbn_cpu_level(int level) { (void)level; return 0; }
    #endif
    """
    int fastbn_cpu_level(int level) noexcept nogil


def supports(int level):
    """True when this CPU runs code compiled with ``-march=x86-64-v{level}``
    (level 2, 3 or 4); False elsewhere, and for other levels."""
    return bool(fastbn_cpu_level(level))
