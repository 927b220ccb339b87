"""Facts about this CPU: which x86-64 micro-architecture levels it supports,
and what one iteration of an OpenMP runtime's spin-wait costs.

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


cdef extern from *:
    """
    #include <time.h>
    /* One spin-wait iteration as libgomp writes it (config/linux/wait.h,
       do_spin): a relaxed load of the flag, then the CPU's pause hint. Its
       cost varies tenfold between CPUs (and more under a hypervisor), so the
       runtime's spin count, an iteration count, is converted from time here. */
    static double fastbn_spin_seconds(long iterations)
    {
        static volatile int flag = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 0; i < iterations; i++) {
            if (__atomic_load_n(&flag, __ATOMIC_RELAXED))
                break;
    #if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
    #elif defined(__aarch64__)
            __asm__ __volatile__("yield" ::: "memory");
    #endif
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    }
    """
    double fastbn_spin_seconds(long iterations) noexcept nogil


def spin_seconds(long iterations):
    """Seconds that ``iterations`` spin-wait iterations (a relaxed load and
    a pause, as in libgomp's wait loop) take on this CPU now."""
    cdef double seconds
    with nogil:
        seconds = fastbn_spin_seconds(iterations)
    return seconds
