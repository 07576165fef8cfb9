"""Accuracy on ONNX Runtime's ARM64 int8 kernels, on an x86 host: qemu-user's Neoverse-N1.

No ARM machine is lent here, but ONNX Runtime's aarch64 wheel runs under `qemu-aarch64`
(user mode, a Neoverse-N1: ARMv8.2 with the dot product, like Graviton 2 or Ampere Altra),
so the outputs are what such a CPU computes; only the time is not (emulation is ~100x
slower: the small and medium models only). Two quirks are handled:

- qemu-user shows the host's x86 /proc/cpuinfo, on which ONNX Runtime's cpuinfo crashes at
  import: the child runs in a private mount namespace (`unshare --mount`, root) with an ARM
  /proc/cpuinfo bound over it.
- The arm64 Python is Debian's own (bookworm packages unpacked, not installed) with the
  aarch64 wheels of the versions this venv runs, so both sides run the same ONNX Runtime.

    sudo-less root: .venv/bin/python benchmarks/arm64.py setup      # the environment, once
    .venv/bin/python benchmarks/arm64.py run [--models mnist,...]   # results/arm64-<host>.json
    .venv/bin/python benchmarks/arm64.py render RESULTS             # the docs table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from models import DEFAULT_CACHE, REPO, SPECS, files

ENV = DEFAULT_CACHE / "arm64"
CPU = "neoverse-n1"
FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc"
CPUINFO = f"""processor\t: 0
BogoMIPS\t: 50.00
Features\t: {FEATURES} dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
DEBS = [
    *("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g"),
    *("libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libgcc-s1", "libstdc++6"),
    *("libsqlite3-0", "libuuid1", "libcrypt1", "libtinfo6", "libncursesw6", "libreadline8"),
    *("libnsl2", "libtirpc3", "libdb5.3"),
]
WHEELS = ("onnx", "onnxruntime", "onnx-ir", "ml-dtypes", "numpy", "typer", "rich")
MODELS = ("mnist", "digits_sample", "efficientnet", "minilm")  # emulated: minutes each
# The defaults of both tools and quantcli's full 8-bit target.
CONTENDERS = ("ort-default", "ort-tuned", "quantcli", "quantcli-cpu-vnni")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def setup(env: Path = ENV) -> None:
    """Unpack Debian's arm64 Python and the aarch64 wheels of this venv's versions."""
    root, site, downloads = env / "root", env / "site", env / "downloads"
    for d in (root, site, downloads):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg", "--add-architecture", "arm64"], check=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    debs = [f"{d}:arm64" for d in DEBS]
    subprocess.run(["apt-get", "download", *debs], cwd=downloads, check=True)
    for deb in sorted(downloads.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    pins = env / "constraints.txt"
    pins.write_text("\n".join(x for x in freeze.splitlines() if "==" in x and "@" not in x))
    platforms = ["manylinux_2_28_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:"]
    cmd += [a for p in [*platforms, "any"] for a in ("--platform", p)]
    cmd += ["--python-version", "3.11", "-c", str(pins), *WHEELS, "-d", str(downloads)]
    subprocess.run(cmd, check=True)
    for whl in sorted(downloads.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    (env / "cpuinfo").write_text(CPUINFO)
    log(f"arm64 environment in {env}")


def available(env: Path = ENV) -> bool:
    needed = [env / "root/usr/bin/python3.11", env / "site/onnxruntime", env / "cpuinfo"]
    return os.uname().machine == "x86_64" and all(p.exists() for p in needed)


def emulated(args: list[str], env: Path = ENV, timeout: float = 7200) -> str:
    """Run python3.11 ARGS on the emulated core; returns stdout, raises on failure."""
    python = [
        "qemu-aarch64", "-cpu", CPU, "-L", str(env / "root"),
        "-E", f"PYTHONPATH={env / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "-E", f"PYTHONHOME={env / 'root/usr'}", str(env / "root/usr/bin/python3.11"), *args,
    ]  # fmt: skip
    inner = f'mount --bind {shlex.quote(str(env / "cpuinfo"))} /proc/cpuinfo && exec "$@"'
    cmd = ["unshare", "--mount", "sh", "-c", inner, "sh", *python]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return done.stdout


def child(model: str, eval_npz: str, task: str, out: str) -> None:
    """On the emulated core: the model's outputs on the evaluation set, as run.py takes them."""
    import onnxruntime as ort
    from measure import open_session, outputs

    from quantcli.evaluate.host import describe_host

    host = describe_host("cpu").to_dict()
    if host["int8_isa"] != "ARM dot product" or host["int16_saturation"] is not False:
        sys.exit(f"not the emulated ARM64 core with the dot product: {host}")
    data = dict(np.load(eval_npz))
    np.save(out, outputs(open_session(Path(model), 1), data, task))
    print(json.dumps(host | {"onnxruntime": ort.__version__}))


def run(args: argparse.Namespace) -> None:
    from machine import host_kind, machine_info, snapshot_code
    from measure import METRICS, open_session, outputs

    code = snapshot_code(args.allow_dirty)
    kind, _ = host_kind()
    res: dict[str, Any] = {
        "meta": machine_info()
        | {"command": shlex.join([sys.executable, *sys.argv]), "code": code, "emulated": CPU},
        "models": {},
    }
    out_path = args.out or REPO / "benchmarks" / "results" / f"arm64-{kind}.json"
    if out_path.exists():  # models run apart (emulation is slow) join one file
        res["models"] = json.loads(out_path.read_text())["models"]
    for name in args.models.split(","):
        spec, f = SPECS[name], files(args.cache, name)
        data = dict(np.load(f.eval))
        ref = outputs(open_session(f.model, 1), data, spec.task)
        entry: dict[str, Any] = {"title": spec.title, "task": spec.task, "contenders": {}}
        entry["commit"] = code["commit"]  # this model's run (models may run apart)
        for who in args.contenders.split(","):
            path = args.cache / "out" / name / who / "model.onnx"
            if not path.exists():
                continue
            tmp = args.cache / "out" / name / "arm64.npy"
            start = time.time()
            got_native = outputs(open_session(path, 1), data, spec.task)
            rec: dict[str, Any] = {"native": METRICS[spec.task](ref, got_native, data)}
            try:
                host = emulated([__file__, "child", str(path), str(f.eval), spec.task, str(tmp)])
                rec["arm64"] = METRICS[spec.task](ref, np.load(tmp), data)
                rec["arm64_host"] = json.loads(host.strip().splitlines()[-1])
            except Exception as e:  # one contender's failure is recorded, not fatal
                rec["arm64_error"] = f"{type(e).__name__}: {e}"[:400]
            rec["seconds"] = round(time.time() - start, 1)
            made = time.gmtime(path.stat().st_mtime)
            rec["model_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%S", made)
            entry["contenders"][who] = rec
            log(f"{name} {who}: {rec}")
            res["models"][name] = entry
            out_path.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out_path}")


def render(path: Path) -> str:
    res = json.loads(path.read_text())
    meta = res["meta"]
    lines = [
        f"Emulated ARM64 ({res['meta']['emulated']}, dot product) under qemu-user on "
        f"{meta['host_kind']} ({meta['machine']['cpu']}), onnxruntime "
        f"{meta['versions']['onnxruntime']} on both sides, harness at "
        f"{str(meta['code']['commit'])[:10]}: `{meta['command']}`. The quantized files are "
        "run.py's (their dates are in the results file); each is scored natively and on the "
        "emulated core against the native float outputs.",
        "",
        "| model | contender | metric | this host | ARM64 |",
        "|---|---|---|---|---|",
    ]
    for entry in res["models"].values():
        for who, rec in entry["contenders"].items():
            for key, native in rec["native"].items():
                if key in ("kl", "min_cosine"):
                    continue
                arm = rec.get("arm64", {}).get(key)
                shown = f"{arm:.4f}" if arm is not None else rec.get("arm64_error", "-")
                lines.append(f"| {entry['title']} | {who} | {key} | {native:.4f} | {shown} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("setup")
    r = sub.add_parser("run")
    r.add_argument("--models", default=",".join(MODELS))
    r.add_argument("--contenders", default=",".join(CONTENDERS))
    r.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    r.add_argument("--out", type=Path)
    r.add_argument("--allow-dirty", action="store_true")
    c = sub.add_parser("child")
    c.add_argument("rest", nargs=4)
    d = sub.add_parser("render")
    d.add_argument("results", type=Path)
    args = ap.parse_args()
    if args.what == "setup":
        setup()
    elif args.what == "run":
        run(args)
    elif args.what == "child":
        child(*args.rest)
    else:
        print(render(args.results))


if __name__ == "__main__":
    main()
