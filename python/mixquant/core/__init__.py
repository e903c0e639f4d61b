"""The native core and everything that touches it.

Backend, SIMD and thread selection (:mod:`.backend`), the quantizer's limits
(:mod:`.limits`) and description (:mod:`.spec`), tensor hand-over and checks
(:mod:`.tensors`), the kernels (:mod:`.kernels`), ranges and the clipping
search (:mod:`.ranges`), the roundoff-error table (:mod:`.error`), and the
pure-PyTorch twin of every native kernel (:mod:`.reference`). Nothing here
imports another room of the package.
"""
