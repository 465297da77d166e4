"""riemann-tune's per-worker library: config, model, adapters, optimizer, engine, data, loop, tracking."""

import logging

# On CPUs with AVX512-BF16, bitsandbytes tries to fetch optional kernels from the Hugging Face hub through
# the `kernels` package, and warns at import when it cannot. This project never installs `kernels`
# (nothing is downloaded at run time); the built-in kernels it falls back to are the ones tested here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
