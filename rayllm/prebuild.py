"""Compile DeepSpeed's JIT ops once, into the project's cache, so no run pays their compile.

On CPU these are the shared-memory collective (`init_distributed` builds it) and cpu_adam
(optimizer offload). On GPU DeepSpeed builds what it needs the same way on first use.
"""
from __future__ import annotations

import time

from rayllm.env import apply_worker_env


def main() -> None:
    env = apply_worker_env()
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builders = [CPUAdamBuilder()]
    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        builders.append(ShareMemCommBuilder())
    for b in builders:
        t = time.time()
        if b.is_compatible():
            b.load(verbose=False)
            print(f"[prebuild] {b.NAME}: ready ({time.time() - t:.1f} s) in {env['TORCH_EXTENSIONS_DIR']}")
        else:
            print(f"[prebuild] {b.NAME}: not compatible with this machine, skipped")


if __name__ == "__main__":
    main()
