"""GPU-less verification tools: `python -m madtp_kernels.tools.aot` compiles and reports the Triton kernels."""
