"""Render benchmark results as Markdown: one section per host kind, one table per measure.

python benchmarks/report.py benchmarks/results/*.json [--tuning benchmarks/tuning.json]
    [-o docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HIGHER_BETTER = {"perplexity": False, "kl": False}


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v).replace("|", "\\|")

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows] + [""]


def status(c: dict[str, Any]) -> str:
    s = c.get("status", "")
    return "" if s == "ok" else s


def host_kind(meta: dict[str, Any]) -> str:
    """The results' host kind (older results name only their CPU flags)."""
    if "host_kind" in meta:
        return meta["host_kind"]
    flags = meta["machine"]["flags"]
    if flags.get("amx_int8"):
        return "x86-amx"
    return "x86-avx512-vnni" if flags.get("avx512_vnni") else "x86-avx2"


def machine(meta: dict[str, Any]) -> list[str]:
    m, v = meta["machine"], meta["versions"]
    flags = ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in m["flags"].items())
    code = meta.get("code")
    if code:
        dirty = f", uncommitted diff sha256 {code['diff_sha256'][:12]}" if code["dirty"] else ""
        code_line = f"- Code: commit {code['commit'][:10]}{dirty} (copied aside for the run)"
    else:
        code_line = f"- Code: {v.get('quantcli_git', '?')} (editable install, not pinned)"
    host = meta.get("host")
    kernels = ""
    if host:
        sat = {True: "saturate int16 pairs", False: "accumulate in int32", None: "unknown"}
        kernels = f"; int8: {host['int8_isa']}, u8s8 kernels {sat[host['int16_saturation']]}"
    return [
        f"- Date: {meta['date']} (whole run {meta.get('total_s', '?')} s)",
        code_line,
        f"- Host kind: {host_kind(meta)}{kernels}",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {m.get('memory_gb', '?')} GB; {flags}",
        f"- OS: {m.get('os', '?')}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Sessions: CPUExecutionProvider, intra-op threads {meta['threads']}, "
        f"{meta['latency_rounds']} interleaved latency rounds",
        f"- Command: `{meta['command']}`",
        "",
    ]


def models_table(models: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in models.items():
        i = e.get("info")
        if not i:
            rows.append([name, e["title"], e.get("skipped", "no info.json"), "", "", "", "", ""])
            continue
        ops = ", ".join(f"{k} {n}" for k, n in list(i["ops"].items())[:7])
        rows.append(
            [
                name,
                e["title"],
                i.get("exporter", "?"),
                i["opsets"].get("ai.onnx"),
                f"{i['file_bytes'] / 1e6:.1f}",
                f"{i['initializer_params'] / 1e6:.2f} M / {i['constant_node_params']}",
                f"{i.get('calib_samples', '?')} / {i.get('eval_samples', '?')}",
                ops,
            ]
        )
    head = [
        "model",
        "source",
        "exporter",
        "opset",
        "MB",
        "params in initializers / Constant",
        "calib / eval",
        "most frequent ops",
    ]
    return table(head, rows)


def legend(models: dict[str, Any]) -> list[str]:
    """Each contender's ORT recipe or quantcli arguments, as run (MODEL/CALIB are the files)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for name, e in models.items():
        for cn, c in e["contenders"].items():
            if c["tool"] == "float":
                continue
            how = c["recipe"]
            text = (
                f"quantcli {' '.join(how)} -o OUT.onnx"
                if c["tool"] == "quantcli"
                else json.dumps(how)
            )
            seen.setdefault((cn, text), []).append(name)
    rows = [[cn, ", ".join(ms), f"`{text}`"] for (cn, text), ms in seen.items()]
    return table(["contender", "models", "ORT recipe (benchmarks/ort_tool.py) or command"], rows)


def accuracy(models: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, e in models.items():
        cs = e["contenders"]
        keys = next((list(c["metrics"]) for c in cs.values() if "metrics" in c), [])
        if not keys:
            continue
        rows = [
            [cn, *[c.get("metrics", {}).get(k, "") for k in keys], status(c)]
            for cn, c in cs.items()
        ]
        out += [f"**{name}** ({e['title']})", "", *table(["contender", *keys, "status"], rows)]
        emulated = {cn: c["metrics_avx2"] for cn, c in cs.items() if "metrics_avx2" in c}
        if emulated:
            rows = [[cn, *[m.get(k, "") for k in keys]] for cn, m in emulated.items()]
            out += [
                f"Same files on ONNX Runtime's AVX2 int8 kernels (x86 without VNNI), measured "
                f"under emulation: {e['avx2']['how']}.",
                "",
                *table(["contender", *keys], rows),
            ]
    return out


def latency(models: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in models.items():
        for cn, c in e["contenders"].items():
            for wl, v in c.get("latency", {}).items():
                rows.append(
                    [name, cn, wl, v["median_ms"], v["iqr_ms"], f"{v['ratio_to_float']:.2f}x"]
                )
    return table(["model", "contender", "call", "median ms", "IQR ms", "vs float"], rows)


def size_and_convert(models: dict[str, Any]) -> list[str]:
    rows = []
    for name, e in models.items():
        base = e["contenders"].get("float", {}).get("size_bytes")
        for cn, c in e["contenders"].items():
            conv = c.get("convert", {})
            size = c.get("size_bytes")
            rows.append(
                [
                    name,
                    cn,
                    f"{size / 1e6:.2f}" if size else "",
                    f"{size / base:.2f}x" if size and base else "",
                    conv.get("wall_s", ""),
                    conv.get("peak_rss_mb", ""),
                    conv.get("error", "") if not conv.get("ok", True) else "",
                ]
            )
    head = ["model", "contender", "MB", "vs float", "convert s", "convert peak RSS MiB", "error"]
    return table(head, rows)


def calibration(models: dict[str, Any]) -> list[str]:
    rows = [
        [name, r["tool"], r["samples"], r["wall_s"], r["peak_rss_mb"], r.get("error", "")]
        for name, e in models.items()
        for r in e.get("calibration", [])
    ]
    if not rows:
        return ["(not measured in this run)", ""]
    return table(["model", "calibrator", "samples", "wall s", "peak RSS MiB", "error"], rows)


def compare_checks(models: dict[str, Any]) -> list[str]:
    rows = []
    for name, m in models.items():
        c = m.get("compare_check")
        if not c:
            continue
        if "error" in c:
            rows.append([name, "error", str(c["error"]), "", "", "", ""])
            continue
        plain = c.get("plain_loop_ms", {})
        for key in ("float", "quantcli"):
            a, b = c["compare"]["latency_ms"][key], c["harness"]["latency_ms"][key]
            p = plain.get(key)
            rows.append(
                [
                    name,
                    f"latency median ms ({key})",
                    a,
                    b,
                    f"{a / b:.2f}",
                    "" if p is None else p,
                    "" if p is None else f"{a / p:.2f}",
                ]
            )
        for key in ("top1_agreement", "accuracy"):
            if c["harness"][key] is not None:
                rows.append([name, key, c["compare"][key], c["harness"][key], "", "", ""])
    if not rows:
        return []
    head = [
        "model",
        "measure",
        "quantcli compare",
        "harness rounds",
        "ratio",
        "plain loop",
        "ratio",
    ]
    runs = sorted(
        {c["run"] for m in models.values() if (c := m.get("compare_check", {})).get("run")}
    )
    where = (
        f" From a later run ({', '.join(runs)}) of `benchmarks/run.py --models "
        "mnist,digits_sample,efficientnet --no-calib`, made after compare's timing changed; "
        "both columns come from that run."
        if runs
        else ""
    )
    intro = [
        "",
        "### `quantcli compare` checked against this harness",
        "",
        "The same quantized model measured by `quantcli compare --json` and by the "
        "harness's own evaluation and timing (different code, same data). The harness times "
        "bursts of calls in shuffled rounds of every contender; the plain loop is the median "
        "of 60 back-to-back calls of one model." + where,
        "",
    ]
    return intro + table(head, rows)


def failures(res: dict[str, Any]) -> list[str]:
    if not res["failures"]:
        return ["None.", ""]
    rows = [[f["model"], f["contender"], f["stage"], f["error"]] for f in res["failures"]]
    return table(["model", "contender", "stage", "error (last line, as it happened)"], rows)


def tuning(tune: dict[str, Any]) -> list[str]:
    out = [
        "Each candidate was measured once with `run.py --tune`; the kept ones are `TUNED`, "
        "`TUNED_W8` and `TUNED_INT4` in `benchmarks/contenders.py`.",
        f"Run: {tune['meta']['date']}; `{tune['meta']['command']}`",
        "",
    ]
    for name, e in tune["models"].items():
        cs = e["contenders"]
        keys = next((list(c["metrics"]) for c in cs.values() if "metrics" in c), [])
        calls = next((list(c["latency"]) for c in cs.values() if "latency" in c), [])
        rows = []
        for cn, c in cs.items():
            lat = c.get("latency", {})
            recipe = json.dumps(c["recipe"]) if c["tool"] == "ort" else ""
            rows.append(
                [
                    cn,
                    *[c.get("metrics", {}).get(k, "") for k in keys],
                    *[f"{lat[w]['ratio_to_float']:.2f}x" if w in lat else "" for w in calls],
                    status(c),
                    recipe,
                ]
            )
        head = ["candidate", *keys, *[f"latency {w} vs float" for w in calls], "status", "recipe"]
        out += [f"**{name}**", "", *table(head, rows)]
    return out


def section(res: dict[str, Any]) -> list[str]:
    m = res["models"]
    kind = host_kind(res["meta"])
    return [
        f"## Host kind {kind}",
        "",
        "### Machine",
        "",
        *machine(res["meta"]),
        "### Models and data",
        "",
        *models_table(m),
        "### Contenders",
        "",
        "`ort-default`: ONNX Runtime's quantizer as its documentation shows it (static = "
        "`quant_pre_process` + `quantize_static`, QDQ, MinMax over the whole calibration set, "
        "batch 1; dynamic = `quantize_dynamic`); `ort-tuned`: "
        "the best of a few settings measured once (last section); `ort-tuned-w8`: "
        "weight-only INT8 (MatMulNBits, bits=8), a different trade-off for transformers; "
        "`*-int4`: weight-only INT4, block 32. quantcli runs as a CLI in its own process; "
        "`quantcli` is its default (`--target cpu`, accurate on every CPU), "
        "`quantcli-cpu-vnni` full 8-bit weights for VNNI/AMX x86 and ARM64 dot product.",
        "",
        *legend(m),
        f"### Task accuracy on {kind} (quantized vs float on the evaluation set)",
        "",
        *accuracy(m),
        f"### Latency on {kind} (batch 1, same process, interleaved rounds)",
        "",
        *latency(m),
        "### File size and conversion (each tool in its own process)",
        "",
        *size_and_convert(m),
        "### Calibration time and memory (each run in its own process)",
        "",
        *calibration(m),
        *compare_checks(m),
        "### Failures",
        "",
        *failures(res),
    ]


def render(
    results: list[dict[str, Any]], tune: dict[str, Any] | None, arm: Path | None = None
) -> str:
    kinds = ", ".join(host_kind(r["meta"]) for r in results)
    lines = [
        "# Benchmarks: quantcli vs ONNX Runtime's quantizer",
        "",
        "Generated by `benchmarks/report.py` from real runs of `benchmarks/run.py`, one section "
        f"per host kind ({kinds}): int8 accuracy and speed depend on the CPU's int8 kernels "
        "(docs/int8.md, accurate on every CPU). How to reproduce: `benchmarks/README.md`.",
        "",
        "Other measurements, each with its own results file and page: INT4 against ONNX "
        "Runtime's MatMulNBits quantizer (`benchmarks/int4_bench.py`, "
        "`results/int4-<host kind>.json`, docs/int4.md); `quantcli tune` against NNCF's "
        "accuracy control and ONNX Runtime's best (`benchmarks/tune_bench.py`, "
        "`results/tune-<host kind>.json`, docs/tune.md); calibration methods and bias "
        "correction (`run.py --only ...`, `results/methods-<host kind>.json`, "
        "docs/calibration.md); the Ray cluster (`benchmarks/cluster.py`, "
        "`results/cluster-<host kind>.json`, docs/cluster.md).",
        "",
    ]
    for res in results:
        lines += section(res)
    if arm is not None:
        import arm64

        lines += [
            "## Host kind arm64-dotprod (emulated: accuracy only)",
            "",
            arm64.render(arm),
        ]
    if tune:
        lines += ["## How ort-tuned was chosen", "", *tuning(tune)]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="one results file per host kind")
    ap.add_argument("--tuning", type=Path, nargs="*", help="results of `run.py --tune`")
    ap.add_argument("--arm64", type=Path, help="results of `arm64.py run` (accuracy on ARM64)")
    ap.add_argument("-o", "--out", type=Path, help="Markdown file (default: stdout)")
    args = ap.parse_args()
    results = [json.loads(p.read_text()) for p in args.results if not p.stem.endswith("-quick")]
    tune = None
    for path in args.tuning or []:  # later files win per model
        part = json.loads(path.read_text())
        tune = part if tune is None else tune | {"models": tune["models"] | part["models"]}
    text = render(results, tune, args.arm64)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
