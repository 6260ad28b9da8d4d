"""Compile the trainer's step for a TPU slice on any machine (no TPU needed), before renting the slice.

  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu: the TPU compiler
  python scripts/aot_compile.py --config configs/blt_1b.py --topology v5p:4x4x8 \
      --entropy_config configs/entropy_100m.py [--config.global_batch_size=128 ...]

Prints the compile time, the HBM one chip needs (arguments, temporaries, total, against the chip's HBM), XLA's
FLOPs per chip per step against flops.py's, and the collectives of the partitioned program; exits with 1 when the
step does not fit. See blt_jax/aot.py.

  python scripts/aot_compile.py --step score --config configs/blt_7b.py --topology v5e:2x4 \
      --entropy_config configs/entropy_100m.py --dtype bfloat16 --mesh fsdp=8

compiles the scorer's programs (`--step generate`: the generator's prefill and cached steps) with the params placed
as `--dtype` / `--mesh` place them, and says per chip whether they fit. See blt_jax/aot_inference.py.
"""

import os
import pathlib
import sys

# Nothing runs here: the local backend only hosts the tracing, so skip probing for accelerators.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from blt_jax import aot  # noqa: E402

if __name__ == "__main__":
  sys.exit(aot.main())
