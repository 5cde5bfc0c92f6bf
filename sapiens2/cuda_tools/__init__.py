"""Tools for the hand-written CUDA kernels in ``csrc/`` that need no GPU: the CPU emulation build
that runs them in tests (:mod:`.emu`) and the ptxas compile gate (:mod:`.gate`)."""
