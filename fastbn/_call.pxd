# What one kernel call does: the struct the compiled front (fastbn/_front.pyx)
# fills once its arguments are checked, and the one entry point of each kernel
# module (``run`` of fastbn/_planar.pyx and fastbn/_columnar.pyx) reads. Each
# kernel module hands its entry to the front as the capsule ENTRY, so that the
# front calls the variant fastbn._dispatch chose without any Python in between.

cdef enum:
    MODE_FORWARD = 0        # training forward: statistics, normalize, running statistics
    MODE_INFERENCE = 1      # normalize with the running statistics
    MODE_BACKWARD = 2       # the fused backward (frozen and grad say which)

cdef enum:
    # which steps of its pass a call runs (Call.steps)
    STEP_SUMS = 1           # the per-channel sums (alone: into Call.totals)
    STEP_APPLY = 2          # the apply (alone: with the maps of Call.maps)
    STEPS_ALL = 3           # every public function: sums, maps, apply

cdef enum:
    # the data's type (a, b, out); the other arrays are float64 with
    # float64 data and float32 with any other
    DTYPE_FLOAT32 = 0
    DTYPE_FLOAT64 = 1
    DTYPE_FLOAT16 = 2
    DTYPE_BFLOAT16 = 3

cdef enum:
    # fused activations (the codes of fastbn._checks.ACTIVATIONS)
    ACT_NONE = 0
    ACT_RELU = 1
    ACT_LEAKY_RELU = 2

cdef enum:
    # what a backward's two inputs are (fastbn._stats.Grad)
    GRAD_PLAIN = 0     # dy and x, as the plain backward reads them
    GRAD_ACT = 1       # dy of an activated output and x
    GRAD_OUTPUT = 2    # dy of an activated output and that output y

# The capsule's name (PyCapsule_New / PyCapsule_GetPointer).
cdef extern from *:
    """
    #define FASTBN_ENTRY_NAME "fastbn._call.Entry"
    """
    const char* ENTRY_NAME "FASTBN_ENTRY_NAME"


cdef struct Call:
    int mode                 # MODE_*
    int steps                # STEP_*: STEPS_ALL, or one half of a training pass (the
                             # synchronized passes of fastbn.distributed reduce in between)
    int dtype                # DTYPE_*: of a, b and out; the parameters' and statistics'
                             # type is float64 with float64 data, float32 otherwise
    Py_ssize_t n, c, s       # the view: planar (N, C, S); columnar (M, C) with s == 1
    const void* a            # x (forward, inference), dy (backward)
    const void* b            # backward: x, or y with GRAD_OUTPUT; else NULL
    void* out                # y or dx; may be a (in place), or b from the output
    const void* gamma        # (C,) or NULL (1)
    const void* beta         # (C,) or NULL (0); the backward reads it with an activation only
    const void* mean         # backward: the forward's mean (NULL from the output)
    const void* invstd       # backward: the forward's invstd
    void* save_mean          # forward: written
    void* save_invstd        # forward: written
    void* running_mean       # forward: updated, or NULL; inference: read
    void* running_var
    void* dgamma             # backward: written, or NULL (frozen, not wanted)
    void* dbeta
    void* r                  # Batch Renormalization: the forward writes r and d, the
    void* d                  # backward reads them; NULL in the plain layer
    double rmax, rmin, dmax  # the forward's clipping of r to [rmin, rmax] and d to [-dmax, dmax]
    bint renorm              # Batch Renormalization (Ioffe 2017): r, d, rmax, rmin, dmax
    Py_ssize_t groups        # Ghost Batch Normalization: the training pass runs on each of
                             # that many consecutive row blocks (virtual batches) of n / groups
                             # rows; save_mean, save_invstd, r, d (forward) and mean, invstd,
                             # r, d (backward) are (groups, C); 1 for the plain layer
    double* moments          # a forward of one group: (C, 2) written, each channel's mean and
                             # biased variance, instead of updating the running statistics
                             # (set by the group driver only, else NULL)
    double* totals           # STEP_SUMS alone: (C, 2) written, the two sums of each channel
    const double* maps       # STEP_APPLY alone: (C, 4) read, each channel's Coef (fastbn._stats)
    double eps               # forward, inference
    double factor            # forward: weight of the batch in the running statistics
    bint unbiased            # forward: the running variance takes var * m / (m - 1)
    bint frozen              # backward: mean and invstd are constants
    bint param_grads         # backward: dgamma and dbeta are written (else frozen: not wanted)
    int grad                 # backward: GRAD_PLAIN, GRAD_ACT or GRAD_OUTPUT (fastbn._stats)
    int act                  # ACT_NONE, ACT_RELU or ACT_LEAKY_RELU (fastbn._stats)
    double slope             # leaky_relu's negative slope
    int num_threads          # resolved, >= 1
    bint stream              # out is the caller's buffer: stream it when large (the entry's
                             # run decides it once, by the size of the whole call)
    bint cold                # x of the whole call (a ghost group's: its batch's) is at least
                             # STREAM_MIN_BYTES, more than the per-core caches hold: it comes
                             # from memory (set by the entry's run, as stream)


# 0 on success, -1 when the work space could not be allocated (nothing written).
ctypedef int (*Entry)(const Call*) noexcept nogil
