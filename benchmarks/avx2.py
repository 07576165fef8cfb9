"""Accuracy on ONNX Runtime's AVX2 int8 kernels, on any x86 host: qemu-user's Haswell model.

Under `qemu-x86_64 -cpu Haswell` ONNX Runtime dispatches its AVX2 kernels (int16 pair
sums that saturate), so the outputs are what an x86 CPU without VNNI computes; only the time
is not (emulation is 100-200x slower, so only the small models are run here). The parent
(run.py) computes the metrics from these outputs exactly as for the native ones.

    qemu-x86_64 python benchmarks/avx2.py MODEL EVAL.npz TASK OUT.npy   (run.py does this)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HASWELL = "Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-rtm,-invpcid"  # quiet: TCG lacks those
TASKS = ("mnist", "imagenet")  # fast enough under emulation (see the docstring)
# The defaults of both tools and full 8-bit: what the AVX2 question is about.
CONTENDERS = ("ort-default", "ort-tuned", "quantcli", "quantcli-cpu-vnni")


def available() -> bool:
    return os.uname().machine == "x86_64" and shutil.which("qemu-x86_64") is not None


def emulated_outputs(model: Path, eval_npz: Path, task: str, out: Path, timeout: float) -> None:
    """Run this file's main() under qemu's Haswell CPU; raises on failure."""
    env = dict(os.environ, QEMU_CPU=HASWELL)
    # qemu 7.2 faults on masked-out lanes of AVX2 masked loads near an unmapped page (a real
    # CPU does not); numpy's AVX2 sort does such loads. Keep numpy on its baseline paths
    # (the feature group is named X86_V3 from numpy 2.4); ONNX Runtime keeps AVX2.
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        env["NPY_DISABLE_CPU_FEATURES"] = "X86_V3"
    cmd = ["qemu-x86_64", sys.executable, __file__, str(model), str(eval_npz), task, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1][:300])


def main() -> None:
    from measure import open_session, outputs

    from quantcli.evaluate.host import int16_pairs_saturate

    model, eval_npz, task, out = sys.argv[1:5]
    if not int16_pairs_saturate():
        sys.exit("the emulated CPU does not saturate int16 pairs: not an AVX2 run")
    data = dict(np.load(eval_npz))
    np.save(out, outputs(open_session(Path(model), 1), data, task))


if __name__ == "__main__":
    main()
