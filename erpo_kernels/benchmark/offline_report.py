"""bench/OFFLINE.md from the rows of :mod:`erpo_kernels.benchmark.offline`: one table per device, and a
reading computed from the rows (no figure in it is typed by hand)."""
from __future__ import annotations

import datetime
import os
import subprocess
from typing import Dict, List, Optional, Sequence

# register file and shared memory per SM (bytes), for the resident-programs estimate
_SM_LIMITS = {"H100": (65536, 228 * 1024), "A100": (65536, 164 * 1024)}
_GEMM_KERNELS = ("linear_stats_fwd", "linear_grad_fused")


def programs_per_sm(row: Dict) -> Optional[int]:
    """Estimate of the programs one SM holds: registers (allocated per warp in units of 256, per thread in
    units of 8), shared memory (plus 1 KiB reserved per block), threads (2048), blocks (32)."""
    if not row.get("ok"):
        return None
    regfile, smem = _SM_LIMITS[row["device"]]
    warps = row["num_warps"]
    per_warp = -(-(-(-row["regs"] // 8) * 8 * 32) // 256) * 256
    return max(0, min(regfile // (per_warp * warps), smem // (row["smem"] + 1024), 2048 // (32 * warps), 32))


def _tool_versions() -> str:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    found = []
    for tool, use in (("ptxas", "sm_80"), ("ptxas-blackwell", "sm_90a")):
        try:
            out = subprocess.run([os.path.join(folder, tool), "--version"], capture_output=True, text=True).stdout
            release = [line for line in out.splitlines() if "release" in line]
            found.append(f"{tool} ({use}): {release[0].split('release')[-1].strip() if release else '?'}")
        except OSError:
            found.append(f"{tool}: not found")
    return f"Triton {triton.__version__}; " + "; ".join(found)


def _mma_text(row: Dict) -> str:
    return ", ".join(row["mma"]) if row["mma"] else "none"


def _table(rows: Sequence[Dict]) -> List[str]:
    lines = ["| kernel | launch | dtype | config (blocks, warps, stages) | regs | spills st/ld (B) | smem (KiB) "
             "| MMA | programs/SM (est.) |", "|---|---|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        config = r["config"] + ("" if r["default"] else " (candidate)")
        if not r["ok"]:
            lines.append(f"| {r['label']} | {r['what']} | {r['dtype']} | {config} | - | - | - | "
                         f"FAILED: {r['error'][:120]} | - |")
            continue
        lines.append(f"| {r['label']} | {r['what']} | {r['dtype']} | {config} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem'] / 1024:.1f} | {_mma_text(r)} | "
                     f"{programs_per_sm(r)} |")
    return lines


def _reading(rows: Sequence[Dict], failures: Sequence[str]) -> List[str]:
    ok = [r for r in rows if r["ok"]]
    lines = [f"- {len(ok)} of {len(rows)} launches compiled; the gate found "
             f"{'nothing' if not failures else str(len(failures)) + ' problem(s) (listed below)'}."]
    for device in sorted({r["device"] for r in ok}, reverse=True):
        mine = [r for r in ok if r["device"] == device]
        top = max(mine, key=lambda r: r["smem"])
        lines.append(f"- {device} ({mine[0]['arch']}): largest shared-memory allocation {top['smem'] / 1024:.1f} KiB "
                     f"({top['label']}, {top['dtype']}, {top['config']}); default configs with spills: "
                     f"{sum(1 for r in mine if r['default'] and (r['spill_stores'] or r['spill_loads']))}.")
        for label in _GEMM_KERNELS:  # their main launch: stats without bias, the token-major backward
            for r in (r for r in mine if r["label"] == label and r["default"]
                      and r["what"].startswith(("no bias", "token-major"))):
                lines.append(f"  - {label} {r['dtype']} ({r['what']}): {r['config']}, {_mma_text(r)}, "
                             f"{r['regs']} registers, {r['smem'] / 1024:.0f} KiB, "
                             f"{programs_per_sm(r)} program(s) per SM (est.).")
    lines += [
        "- How to read it: `wgmma m64nNk16` (sm_90a) is one warp group (4 warps) computing a 64-row, N-wide "
        "output tile per instruction; a 128-row tile with 8 warps is two warp groups of 64 rows each, so N is "
        "the tile width (with 8 warps on a 64-row tile the warps split the columns instead: the former stats "
        "default, 64x128 with 8 warps, gave `m64n64k16`). The fused backward issues three products per tile: "
        "the logits (N = BLOCK_V) and the two gradients (N = BLOCK_H, or half of it when the vocab side of "
        "the tile is the 64-row one). tf32 operands give `k8`. `none`: no tensor-core instruction, by design "
        "for fp32 with \"ieee\" precision (torch's default) and for the kernels without a dot product.",
        "- Spills are ptxas's `bytes spill stores / loads`. 255 registers is the most a thread of a 256-thread "
        "program may have (65536 / 256); rows at 255 with no spills have no headroom left, so a change to "
        "those kernels must be re-checked with this command. Programs/SM is an estimate from the registers "
        "and shared memory above, not a measured occupancy.",
    ]
    return lines


def markdown(result: Dict, failures: Sequence[str]) -> str:
    rows = result["rows"]
    today = datetime.date.today().isoformat()
    lines = ["# Offline compile of every kernel launch (no GPU)", "",
             f"Generated {today} by `python -m erpo_kernels.benchmark.offline --out bench/OFFLINE.md` "
             f"({result['seconds']} s). {_tool_versions()}.", "",
             "Each row is one launch the library makes at N=32768, H=4096, V=151936 (stats and grads) or "
             "B=16 x T=2048 (the [tokens]-sized kernels), with the config its launcher picks on that device "
             "(`ops/tile_config.py`), compiled by Triton for a stub `GPUTarget` (sm_90a for the H100, sm_80 for "
             "the A100). Registers and spills are ptxas's report; shared memory is the compiled kernel's; MMA is "
             "read from the PTX. dtype `tf32` is fp32 operands when torch allows TF32; `fp32` is fp32 with "
             "\"ieee\" dot precision (torch's default).", "", "## Reading", ""]
    lines += _reading(rows, failures)
    if failures:
        lines += ["", "## Gate failures", ""] + [f"- {f}" for f in failures]
    if result.get("uncovered"):
        lines += ["", "## Kernels missing from the launch list", ""] + [f"- {k}" for k in result["uncovered"]]
    for device in sorted({r["device"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["device"] == device]
        lines += ["", f"## {device} ({mine[0]['arch']})", ""] + _table(mine)
    return "\n".join(lines) + "\n"


def summary(result: Dict, failures: Sequence[str]) -> str:
    rows = result["rows"]
    text = [f"{sum(r['ok'] for r in rows)}/{len(rows)} launches compiled in {result['seconds']} s; "
            f"gate failures: {len(failures)}; uncovered kernels: {result['uncovered'] or 'none'}"]
    return "\n".join(text + [f"  {f}" for f in failures])
