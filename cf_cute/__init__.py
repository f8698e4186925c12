"""cf_cute: fused LLM decode kernels for NVIDIA Hopper in the CuTe DSL."""
__version__ = "0.1.0"
