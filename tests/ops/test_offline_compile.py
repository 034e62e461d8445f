"""The offline compile gate (``erpo_kernels.benchmark.offline``): every kernel launch the library makes on an
H100 and an A100 at N=32768, H=4096, V=151936, compiled by Triton's own compiler for sm_90a and sm_80 against
a stub ``GPUTarget`` (no GPU; ptxas ships in Triton's wheel).  Never skipped: this is what proves on a CPU
that the GPU path compiles, does not spill and uses the tensor-core instructions it was designed for.

What the one compile run below covers: every launch variant of ``launch_variants`` (each kernel in
``erpo_kernels.ops``, with the flags and the default config its launcher uses) for bf16, fp32 ("ieee") and
tf32 operands on both devices; fp16 launches share the bf16 configs and code path and are left to the full
table (``python -m erpo_kernels.benchmark.offline --out bench/OFFLINE.md``).  About 40 s on 2 cores.
"""
from __future__ import annotations

import pytest

from erpo_kernels.benchmark import offline
from erpo_kernels.benchmark.offline_report import programs_per_sm


@pytest.fixture(scope="module")
def compiled():
    result = offline.run(["H100", "A100"], ["bf16", "fp32", "tf32"])
    return result, {(r["label"], r["device"], r["dtype"], r["what"]): r for r in result["rows"]}


def test_every_library_kernel_is_in_the_launch_list(compiled):
    result, _ = compiled
    assert result["uncovered"] == [], f"kernels no launch variant compiles: {result['uncovered']}"


def test_every_launch_compiles_within_limits_without_spills(compiled):
    result, rows = compiled
    assert len(rows) >= 60, f"only {len(rows)} launches compiled"
    failures = offline.gate_failures(result["rows"])
    assert not failures, "\n".join(failures)


def _row(rows, label, device, dtype, what):
    matches = [r for key, r in rows.items() if key[:3] == (label, device, dtype) and key[3].startswith(what)]
    assert len(matches) == 1, (label, device, dtype, what, [k for k in rows if k[0] == label])
    return matches[0]


@pytest.mark.parametrize("label,what,shape", [
    ("linear_stats_fwd", "no bias", "m64n256k16"),
    ("linear_grad_fused", "token-major", "m64n128k16"),
    ("linear_grad_fused", "deterministic: grad_hidden", "m64n128k16"),
    ("linear_grad_fused", "deterministic: grad_weight", "m64n128k16"),
])
def test_hopper_bf16_gemms_issue_large_warp_group_mma(compiled, label, what, shape):
    row = _row(compiled[1], label, "H100", "bf16", what)
    assert f"wgmma {shape} bf16" in row["mma"], row["mma"]


def test_tf32_reaches_tensor_cores_and_ieee_does_not(compiled):
    rows = compiled[1]
    assert any(m.startswith("wgmma") and m.endswith("tf32") for m in _row(rows, "linear_stats_fwd", "H100", "tf32",
                                                                           "no bias")["mma"])
    assert "mma.sync m16n8k8 tf32" in _row(rows, "linear_stats_fwd", "A100", "tf32", "no bias")["mma"]
    assert _row(rows, "linear_stats_fwd", "H100", "fp32", "no bias")["mma"] == []


def test_ampere_bf16_stats_use_mma_sync(compiled):
    assert "mma.sync m16n8k16 bf16" in _row(compiled[1], "linear_stats_fwd", "A100", "bf16", "no bias")["mma"]


def test_mma_parser_and_gate_on_synthetic_input():
    ptx = ("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {...};\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};\n")
    assert offline.mma_instructions(ptx) == ["mma.sync m16n8k8 tf32", "wgmma m64n256k16 bf16"]
    good = dict(label="k", what="w", dtype="bf16", arch="sm_90a", config="c", device="H100", ok=True, default=True,
                regs=255, spill_stores=0, spill_loads=0, smem=227 * 1024, mma=["wgmma m64n128k16 bf16"],
                gates=["wgmma"], num_warps=8)
    assert offline.gate_failures([good]) == []
    assert programs_per_sm(good) == 1
    for change, reason in ((dict(spill_stores=4), "spills"), (dict(smem=227 * 1024 + 1), "shared memory"),
                           (dict(mma=["mma.sync m16n8k16 bf16"]), "no wgmma"),
                           (dict(ok=False, error="boom"), "does not compile")):
        (failure,) = offline.gate_failures([dict(good, **change)])
        assert reason in failure
    assert offline.gate_failures([dict(good, default=False, spill_stores=8)]) == []  # candidates may spill
