"""The GPU-free `estimate` backend: the peak memory of the canonical train step from a trace on
fake CPU tensors that allocate as CUDA would (docs/estimate.md), and the largest micro-batch that
fits a device from it."""
