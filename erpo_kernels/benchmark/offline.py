"""Offline compile gate: every kernel launch of ``launch_variants`` compiled for sm_90a (H100) and sm_80 (A100)
by Triton's own compiler against a stub ``GPUTarget``: no GPU needed.  Triton's wheel ships ptxas, whose log
gives registers and spill bytes; the compiled kernel's metadata gives shared memory; the PTX names the MMA
instruction (``wgmma.mma_async`` on Hopper, ``mma.sync`` on Ampere, none for FMA-only code).

    python -m erpo_kernels.benchmark.offline --out bench/OFFLINE.md          # the full table (~2 min, 2 cores)
    python -m erpo_kernels.benchmark.offline --candidates --devices H100 --dtypes bf16   # + autotune configs
    python -m erpo_kernels.benchmark.offline --json rows.json --kernels linear_stats_fwd

Compilation runs in worker processes whose environment has no ``TRITON_INTERPRET`` (with it set,
``@triton.jit`` builds interpreter functions at import) and a fresh ``TRITON_CACHE_DIR`` (a cache hit would
skip ptxas and so its log).  A real launch specializes arguments the same way (``native_specialize_impl``):
ints equal to 1 become constants, multiples of 16 and tensors get 16-byte divisibility.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

GATE_LIMITS = {"H100": 227 * 1024, "A100": 163 * 1024}   # max dynamic shared memory per block, bytes
_MMA = [(re.compile(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\.\w+"), "wgmma"),
        (re.compile(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.f32\.(\w+)\.\w+\.f32"), "mma.sync")]


def mma_instructions(ptx: str) -> List[str]:
    """The distinct tensor-core MMA instructions in ``ptx``, e.g. ["wgmma m64n256k16 bf16"]."""
    found = set()
    for pattern, name in _MMA:
        found.update(f"{name} {shape} {dtype}" for shape, dtype in pattern.findall(ptx))
    return sorted(found)


def _jit_function(kernel):
    """(the JITFunction under any ``triton.heuristics`` wrappers, those wrappers outermost first)."""
    from triton.runtime.jit import JITFunction

    wrappers = []
    while not isinstance(kernel, JITFunction):
        wrappers.append(kernel)
        kernel = kernel.fn
    return kernel, wrappers


def _source(variant):
    """The ASTSource a launch with these arguments would compile (signature, constants, alignment)."""
    import importlib

    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import MockTensor
    from triton._C.libtriton import native_specialize_impl

    module, attr = variant.kernel.split(":")
    jit_fn, wrappers = _jit_function(getattr(importlib.import_module(module), attr))
    meta = dict(variant.meta)
    for wrapper in wrappers:  # heuristics see the launch arguments, as at run time
        for name, rule in getattr(wrapper, "values", {}).items():
            meta[name] = rule({**variant.args, **meta})
    runtime = [n for n in jit_fn.arg_names if n not in meta]
    if sorted(runtime) != sorted(variant.args):
        raise ValueError(f"{variant.label}: arguments {sorted(variant.args)} do not match the kernel's runtime "
                         f"arguments {sorted(runtime)}")
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(jit_fn.arg_names):
        if name in meta:
            signature[name], constants[(i,)] = "constexpr", meta[name]
            continue
        value = variant.args[name]
        value = MockTensor(value) if isinstance(value, torch.dtype) else value
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constants[(i,)] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return ASTSource(jit_fn, signature, constexprs=constants, attrs=attrs)


def compile_variant(variant, capability: int) -> Dict:
    """One row: registers, spill bytes, shared memory and MMA instructions of ``variant`` for sm_<capability>."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = dict(label=variant.label, what=variant.what, device=variant.device, dtype=variant.dtype,
               config=variant.config, default=variant.default, gates=list(variant.gates),
               num_warps=variant.num_warps,
               arch="sm_90a" if capability >= 90 else f"sm_{capability}", ok=False)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(_source(variant), target=GPUTarget("cuda", capability, 32),
                                      options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
        text = log.getvalue()
        regs = re.search(r"Used (\d+) registers", text)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if regs is None or spills is None:
            raise RuntimeError(f"no ptxas resource report in the compile log: {text[-300:]!r}")
        row.update(ok=True, regs=int(regs.group(1)), spill_stores=int(spills.group(1)),
                   spill_loads=int(spills.group(2)), smem=int(compiled.metadata.shared),
                   mma=mma_instructions(compiled.asm["ptx"]))
    except Exception as exc:  # a failed compile is a row (the gate reports it), not a crash of the table
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _select(args):
    from erpo_kernels.benchmark import launch_variants as lv

    variants = lv.all_variants(args.devices, args.dtypes, args.candidates)
    if args.kernels:
        variants = [v for v in variants if v.label in args.kernels]
    return lv, variants


def _worker(args) -> None:
    """Compile this worker's share (every ``jobs``-th variant) and print one JSON row per line."""
    lv, variants = _select(args)
    shard, jobs = (int(x) for x in args.worker.split("/"))
    if shard == 0:
        print(json.dumps({"uncovered": lv.uncovered_kernels(lv.all_variants())}), flush=True)
    for index in range(shard, len(variants), jobs):
        variant = variants[index]
        row = compile_variant(variant, lv.DEVICES[variant.device].capability)
        print(json.dumps(dict(row, index=index)), flush=True)


def run(devices: Sequence[str], dtypes: Sequence[str], kernels: Sequence[str] = (), candidates: bool = False,
        jobs: Optional[int] = None, timeout: float = 1200.0) -> Dict:
    """Compile in ``jobs`` worker processes (clean environment, fresh Triton cache); returns
    ``{"rows": [...], "uncovered": [...], "seconds": ...}``.  Callable from any environment, tests included."""
    jobs = jobs or os.cpu_count() or 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="erpo-offline-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        # the workers import this very checkout, whatever is installed
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        cmd = [sys.executable, "-m", "erpo_kernels.benchmark.offline", "--devices", ",".join(devices),
               "--dtypes", ",".join(dtypes)] + (["--kernels", ",".join(kernels)] if kernels else []) \
            + (["--candidates"] if candidates else [])
        procs = [subprocess.Popen(cmd + ["--worker", f"{k}/{jobs}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env, text=True) for k in range(jobs)]
        rows, uncovered = [], None
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"offline compile worker failed ({proc.returncode}):\n{err[-3000:]}")
            for line in out.splitlines():
                item = json.loads(line)
                if "uncovered" in item:
                    uncovered = item["uncovered"]
                else:
                    rows.append(item)
    rows.sort(key=lambda r: r["index"])
    return {"rows": rows, "uncovered": uncovered, "seconds": round(time.perf_counter() - start, 1)}


def gate_failures(rows: Sequence[Dict]) -> List[str]:
    """What the CI gate rejects: a failed compile; spills in a default config; shared memory over the device's
    per-block limit; no warp-group MMA where a variant expects one."""
    bad = []
    for r in rows:
        name = f"{r['label']} [{r['what']}] {r['dtype']} {r['arch']} {r['config']}"
        if not r["ok"]:
            bad.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["default"] and (r["spill_stores"] or r["spill_loads"]):
            bad.append(f"{name}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["smem"] > GATE_LIMITS[r["device"]]:
            bad.append(f"{name}: {r['smem']} B shared memory > {GATE_LIMITS[r['device']]} B")
        if "wgmma" in r["gates"] and not any(m.startswith("wgmma") for m in r["mma"]):
            bad.append(f"{name}: no wgmma (MMA: {r['mma'] or 'none'})")
    return bad


def _csv(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from erpo_kernels.benchmark import offline_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown table here (e.g. bench/OFFLINE.md)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--devices", type=_csv, default=["H100", "A100"])
    parser.add_argument("--dtypes", type=_csv, default=["bf16", "fp16", "fp32", "tf32"])
    parser.add_argument("--kernels", type=_csv, default=[], help="only these kernel labels")
    parser.add_argument("--candidates", action="store_true", help="add the ERPO_AUTOTUNE candidates")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    result = run(args.devices, args.dtypes, args.kernels, args.candidates, args.jobs)
    failures = gate_failures(result["rows"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    text = offline_report.markdown(result, failures)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(offline_report.summary(result, failures))
    return 1 if failures or result["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
