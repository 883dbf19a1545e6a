"""llmctl: a command-line toolchain for the whole language-model workflow (preprocess, train, generate, eval)."""

import os as _os

__version__ = "0.1.0"


def _tune_mkl() -> None:
    """On AMD CPUs with AVX-512, ask MKL for its AVX-512 code path (`MKL_CBWR=AVX512`) unless the user chose one:
    MKL otherwise runs a generic path on non-Intel CPUs. Measured on a 2-core AMD EPYC: an 8-row fp32 product by a
    768 x 3072 matrix took 400 us instead of 610, `model.generate` on a 6 x 384 GPT-2 at batch 8 went from 926 to
    1,201 tokens/s. Set here, before torch makes its first MKL call (MKL reads it once)."""
    if "MKL_CBWR" in _os.environ or "MKL_ENABLE_INSTRUCTIONS" in _os.environ:
        return
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            head = f.read(1 << 16)
    except OSError:
        return
    if "AuthenticAMD" in head and " avx512f" in head and " avx512bw" in head:
        _os.environ["MKL_CBWR"] = "AVX512"


_tune_mkl()
