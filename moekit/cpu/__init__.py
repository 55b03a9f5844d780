"""Everything native on a CPU: the C++ extension (``csrc/``, built on first use by :mod:`moekit.cpu.build`),
its typed options (:mod:`moekit.cpu.options`), the fp32 GEMM primitives (:mod:`moekit.cpu.gemm`), the C++
expert loop (:mod:`moekit.cpu.loop`), the row bucketing of per-expert GEMMs (:mod:`moekit.cpu.rows`) and
the block cache (:mod:`moekit.cpu.cache`).

Which of these runs is decided in one place, :mod:`moekit.moe.backends.chooser`; the modules here
decide nothing and import nothing of moekit outside this package. Importing this package loads no
native code.
"""
