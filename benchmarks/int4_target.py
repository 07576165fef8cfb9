"""Where SmolLM2's 4-bit error comes from: the output head or the body (issue #13's target of
perplexity <= 1.03x float at a 4.5-bits-per-weight budget).

    .venv/bin/python benchmarks/int4_target.py [--gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf]
    .venv/bin/python benchmarks/int4_target.py --float-zero-points   # after int4_bench.py
    .venv/bin/python benchmarks/int4_target.py \\
        --render benchmarks/results/int4-target-<host>.json \\
        --docs docs/int4.md

Each setting is one `quantcli convert --json` in its own process (`proc.py`). Some settings
keep part of the model float with --exclude. This splits the error between the head (with
the embedding lookup that reads its table) and the body, and it stands in for a near-exact
copy of those layers. The 30 layers' K, V and FFN-down projections are a third of the body.
Their GGUF source is Q4_1, so a float16 zero point at block 32 would store them almost
exactly, at 5.0 bits per weight with a float16 scale.
Perplexity is measured on the bench's eval windows against the float model. Only sizes and
perplexities are recorded here; speed lives in int4_bench.py. With --gguf (needs `pip install
gguf`) it also records the GGUF's tensor types: what the "float" export was dequantized from.

--float-zero-points asks whether a float zero point (which could copy Q4_1 blocks exactly)
is usable on CPU: it times ONNX Runtime's HQQ file (float zero points; int4_bench.py writes
it) as written (accuracy_level unset, i.e. 0) and with accuracy_level 4 set on every
MatMulNBits, against float and quantcli's default (int4_bench.py's file), interleaved
(`measure.latency`, one thread), and checks whether level 4 changes the outputs at all. It
merges into the out file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from int4_bench import fill_block
from machine import host_kind, machine_info, snapshot_code
from measure import METRICS, file_bytes, latency, open_session, outputs, workloads
from models import DEFAULT_CACHE, REPO, files
from proc import run_tool

# the tied pair: the output head MatMul(x, Transpose(embedding)) and the embedding lookup,
# which quantcli quantizes on its own table when the head stays float
HEAD = ["node_linear_210", "node_embedding"]
LAYERS, PER_LAYER = 30, 7  # q, k, v, o, gate, up, down: node_linear_{7i + j}


def _linear(index: int) -> str:
    return "node_linear" if index == 0 else f"node_linear_{index}"


def _excluding(names: list[str]) -> list[str]:
    return [a for n in names for a in ("--exclude", n)]


BODY = [_linear(PER_LAYER * i + j) for i in range(LAYERS) for j in range(PER_LAYER)]
KVD = [_linear(PER_LAYER * i + j) for i in range(LAYERS) for j in (1, 2, 6)]
Q4 = ["--bits", "4", "--data", "CALIB", "--compact-scales"]
SETTINGS = {
    # the whole model: the setting
    "budget-4.5": [*Q4, "--budget", "4.5"],
    # the body float: what the head alone loses
    "head-8bit": [*Q4, *_excluding(BODY)],  # the default head format
    "head-4bit": [*Q4, "--budget", "4.4", *_excluding(BODY)],
    # the head float: what the body alone loses
    "body-budget-4.55": [*Q4, "--budget", "4.55", *_excluding(HEAD)],
    "body-b64": [*Q4, "--block-size", "64", *_excluding(HEAD)],
    "body-kvd-float-rest-b64": [*Q4, "--block-size", "64", *_excluding(HEAD + KVD)],
    # the same oracle with the head and lookup 4-bit: K, V, FFN down stored exactly at 5.0
    # bits would make this about 4.5 bits per weight for the whole model
    "kvd-float-rest-4bit": [*Q4, "--budget", "4.33", *_excluding(KVD)],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gguf_types(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # optional: only for the record of the source's formats

    tensors, params, head = Counter(), Counter(), None
    for t in GGUFReader(str(path)).tensors:
        tensors[t.tensor_type.name] += 1
        params[t.tensor_type.name] += int(t.n_elements)
        if t.name == "token_embd.weight":
            head = t.tensor_type.name
    return {"file": path.name, "tensors": tensors, "parameters": params, "token_embd": head}


def run(name: str, cache: Path, timeout: float) -> dict[str, Any]:
    f = files(cache, "smollm2")
    out = cache / "out-int4" / "target" / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.iterdir():
        old.unlink()
    args = [str(f.calib) if a == "CALIB" else a for a in SETTINGS[name]]
    report = out.parent / "convert.json"
    cmd = [sys.executable, "-m", "quantcli", "convert", str(f.model), *args, "-o", str(out)]
    rec: dict[str, Any] = {"args": SETTINGS[name]}
    rec["convert"] = run_tool([*cmd, "--json"], timeout, 14, stdout=report)
    if rec["convert"]["ok"]:
        doc = json.loads(report.read_text())
        rec["bits_per_weight"] = doc["int4"]["bits_per_weight"]
        rec["parameters_by_format"] = doc["int4"]["parameters_by_format"]
        rec["float_nodes"] = doc["float"]
        rec["size_bytes"] = file_bytes(out)
    return rec


def float_zero_points(cache: Path, rounds: int) -> dict[str, Any]:
    import onnx

    out4 = cache / "out-int4" / "smollm2"
    hqq = out4 / "ort-hqq" / "model.onnx"
    if not hqq.exists():
        sys.exit(f"{hqq} is missing: run int4_bench.py --models smollm2 --only ort-hqq first")
    proto = onnx.load(str(hqq))
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [x for x in node.attribute if x.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 4)])
    level4 = cache / "out-int4" / "target" / "hqq-level4" / "model.onnx"
    level4.parent.mkdir(parents=True, exist_ok=True)
    for old in level4.parent.iterdir():  # onnx.save appends to an existing data file
        old.unlink()
    onnx.save(proto, str(level4), save_as_external_data=True, location="model.onnx.data")
    del proto
    f = files(cache, "smollm2")
    paths = {"float": f.model, "ort-hqq": hqq, "ort-hqq-level4": level4}
    paths["quantcli-default"] = out4 / "quantcli" / "model.onnx"
    if not paths["quantcli-default"].exists():
        sys.exit(f"{paths['quantcli-default']} is missing: run int4_bench.py --only quantcli")
    sessions = {k: open_session(p, 1) for k, p in paths.items()}
    data = dict(np.load(f.eval))
    ref = outputs(sessions["float"], data, "lm")
    got = {k: outputs(sessions[k], data, "lm") for k in ("ort-hqq", "ort-hqq-level4")}
    names = [i.name for i in sessions["float"].get_inputs()]
    timing = latency(sessions, workloads("lm", data, names), rounds)
    return {
        # the reduced outputs hold NaN where no next token exists
        "level4_changes_outputs": not np.array_equal(
            got["ort-hqq"], got["ort-hqq-level4"], equal_nan=True
        ),
        "perplexity": {k: METRICS["lm"](ref, v, data)["perplexity"] for k, v in got.items()},
        "latency": timing,
    }


def _formats(rec: dict[str, Any]) -> str:
    by = sorted(rec["parameters_by_format"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / 1e6:.1f}" for k, v in by)


def markdown(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [
        f"Measured on {meta['host_kind']}, quantcli at {meta['code']['commit'][:10]}; reproduce "
        f"with `{meta['command']}` (`{res['path']}`). Every setting is `--bits 4 --data "
        "--compact-scales` and its options in the JSON file. Bits per weight count the "
        "quantized weights only; the float ones are left out.",
        "",
        "| setting | float weights | quantized as (M weights) | bits per weight | size MB "
        "| perplexity | x float |",
        "|---|---|---|---|---|---|---|",
        f"| float | all | - | - | {res['float']['size_bytes'] / 1e6:.1f} "
        f"| {res['float']['perplexity']:.2f} | 1.000 |",
    ]
    kept = {"budget-4.5": "none", "head-8bit": "body", "head-4bit": "body"}
    kept["body-kvd-float-rest-b64"] = "head and lookup; K, V, FFN down"
    kept["kvd-float-rest-4bit"] = "K, V, FFN down"
    for name, rec in res["settings"].items():
        if "metrics" not in rec:
            lines.append(f"| {name} | | failed: {rec['convert'].get('error')} | | | | |")
            continue
        lines.append(
            f"| {name} | {kept.get(name, 'head and lookup')} | {_formats(rec)} "
            f"| {rec['bits_per_weight']:.2f} "
            f"| {rec['size_bytes'] / 1e6:.1f} | {rec['metrics']['perplexity']:.2f} "
            f"| {rec['perplexity_ratio']:.3f} |"
        )
    if "float_zero_points" in res:
        z = res["float_zero_points"]
        ms = {k: v for k, v in z["latency"].items() if k != "_reps"}
        lines += [
            "",
            "Float zero points on "
            + z["meta"]["host_kind"]
            + f", quantcli at {z['meta']['code']['commit'][:10]}"
            + f" (`{z['meta']['command']}`), median ms of the 1-token step and the 128-token "
            "prompt: "
            + ", ".join(
                f"{k} {v['step1']['median_ms']:.1f} and {v['prompt128']['median_ms']:.0f}"
                for k, v in ms.items()
            )
            + ". Setting accuracy_level 4 on ONNX Runtime's HQQ file "
            + ("changes" if z["level4_changes_outputs"] else "does not change")
            + " its outputs.",
        ]
    if "gguf" in res:
        g = res["gguf"]
        types = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in g["parameters"].items())
        lines += [
            "",
            f"The source `{g['file']}` holds {types} weights; the table the head "
            f"reads (`token_embd`) is {g['token_embd']}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path)
    p.add_argument("--gguf", type=Path, help="the Q4_1 GGUF the export came from")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--allow-dirty", action="store_true", help="run uncommitted benchmarks/")
    p.add_argument("--float-zero-points", action="store_true", help="only the HQQ speed check")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--render", type=Path, help="a results file to render as Markdown")
    p.add_argument("--docs", type=Path, help="put the rendering in docs' int4-target block")
    args = p.parse_args()
    if args.render:
        res = json.loads(args.render.read_text()) | {"path": args.render.as_posix()}
        fill_block(markdown(res), args.docs, "int4-target")
        return
    kind, _ = host_kind()
    meta = machine_info() | {
        "command": " ".join(["python", *sys.argv]),
        "code": snapshot_code(args.allow_dirty),
    }
    out = args.out or REPO / "benchmarks" / "results" / f"int4-target-{kind}.json"
    if args.float_zero_points:
        if not out.exists():
            sys.exit(f"{out} is missing: run this script without --float-zero-points first")
        res = json.loads(out.read_text())
        res["float_zero_points"] = float_zero_points(args.cache, args.rounds) | {"meta": meta}
        out.write_text(json.dumps(res, indent=1) + "\n")
        log(f"wrote {out}")
        return
    res: dict[str, Any] = {"meta": meta}
    if out.exists():  # keep a --float-zero-points section measured earlier
        earlier = json.loads(out.read_text()).get("float_zero_points")
        res |= {"float_zero_points": earlier} if earlier else {}
    if args.gguf:
        res["gguf"] = gguf_types(args.gguf)
    f = files(args.cache, "smollm2")
    data = dict(np.load(f.eval))
    ref = outputs(open_session(f.model, 2), data, "lm")
    floor = METRICS["lm"](ref, ref, data)["perplexity"]
    res["float"] = {"perplexity": floor, "size_bytes": file_bytes(f.model)}
    res["settings"] = {}
    for name in SETTINGS:
        rec = run(name, args.cache, args.timeout)
        if "size_bytes" in rec:
            path = args.cache / "out-int4" / "target" / name / "model.onnx"
            rec["metrics"] = METRICS["lm"](ref, outputs(open_session(path, 2), data, "lm"), data)
            rec["perplexity_ratio"] = round(rec["metrics"]["perplexity"] / floor, 4)
        log(f"{name}: {rec.get('perplexity_ratio')} {rec.get('bits_per_weight')} bpw")
        res["settings"][name] = rec
        out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
