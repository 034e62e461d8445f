"""The roofline half of the traffic model: what a named GPU can do (datasheet numbers and the few the model
must assume), the calibration, and the time of a phase of known FLOPs, bytes and epilogue work.

Time of one phase: ``max((MMA + epilogue) x tail, HBM bytes / (HBM bandwidth x eff), L2 bytes / (L2 bandwidth
x eff)) + fixed``; a pass is its phases summed (they are kernels that run one after another).
- MMA: FLOPs / (dense peak x ``mma_efficiency``).  Calibration (DESIGN.md): 3 GEMMs at N=32768, H=4096,
  V=151936 bf16 take ~177 ms on an H100: 1.22e14 FLOP / 0.177 s = 0.70 x 989 TFLOP/s.
- Epilogue (the fp32 softmax / dz work of the Triton kernels): the slower of its exps on the special-function
  unit (16 ex2 per clock per SM on Ampere and Hopper: CUDA C Programming Guide, arithmetic instruction
  throughput) and its issue slots (4 warp instructions per clock per SM).  In a Triton kernel it runs on the
  same warps between two K-loops, one program per SM: it adds to the MMA time (``epilogue_overlap`` = 0).
  At H=4096 one logit costs 2 clocks of tensor-core time at peak: the stats kernel's ~12 instructions with
  1 ex2 (128x256 tiles on sm_90a) add ~3% at the calibrated efficiency; at bf16 GEMM speeds the
  exponentials are not free.
- tail: waves of programs, ceil(programs / resident) / (programs / resident).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

MIB = 1 << 20


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers of one GPU (dense peaks, no sparsity) plus the few this model must assume."""
    name: str
    peak_tflops: Dict[str, float]   # dense, by operand dtype; "fp32": CUDA cores (tl.dot "ieee", no TF32)
    hbm_tb_s: float
    memory_gb: float
    l2_mib: float
    l2_tb_s: float                  # no datasheet figure: an assumption (see GPUS)
    sms: int
    clock_ghz: float                # boost, approximate
    smem_per_sm_kib: int
    registers_per_sm: int = 65536
    capability: int = 90            # 90: Hopper (tile_config's "sm90" defaults), 80: Ampere ("sm80")
    exp_per_clk_per_sm: int = 16    # MUFU ex2 (CUDA C Programming Guide, arithmetic instruction throughput)
    issue_per_clk_per_sm: int = 128  # 4 schedulers x 1 warp instruction x 32 threads

    @property
    def l2_bytes(self) -> float:
        return self.l2_mib * MIB


# Vendor datasheets: H100 SXM5 80GB, H200 SXM 141GB, A100 SXM4 80GB.  Clocks: 1.83 GHz is the clock at which
# 132 SMs x 4096 bf16 FLOP/clk give H100's 989 TFLOP/s (boost is up to 1.98 GHz); A100's boost is 1.41 GHz.
# L2 bandwidth has no datasheet figure: A100 is taken as 5120 B/clk (NVIDIA's A100 whitepaper, as recalled,
# not checked here) x 1.41 GHz = 7.2 TB/s, H100/H200 as the same bytes per clock per SM x 132 SMs x 1.83 GHz.
_A100_L2_BYTES_PER_CLK_PER_SM = 5120 / 108
GPUS: Dict[str, GPUSpec] = {
    "h100": GPUSpec("NVIDIA H100 SXM5 80GB", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
                    3.35, 80, 50, _A100_L2_BYTES_PER_CLK_PER_SM * 132 * 1.83e-3, 132, 1.83, 228),
    "h200": GPUSpec("NVIDIA H200 SXM 141GB", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
                    4.8, 141, 50, _A100_L2_BYTES_PER_CLK_PER_SM * 132 * 1.83e-3, 132, 1.83, 228),
    "a100": GPUSpec("NVIDIA A100 SXM4 80GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
                    2.039, 80, 40, 5120 * 1.41e-3, 108, 1.41, 164, capability=80),
}


@dataclass(frozen=True)
class Assumptions:
    """Every calibration and guess of the model, named, with where its default comes from."""
    mma_efficiency: float = 0.70        # DESIGN.md anchor: 3 GEMMs ~177 ms on an H100 (module docstring)
    hbm_efficiency: float = 0.80        # streaming kernels reach ~80% of datasheet HBM bandwidth
    l2_efficiency: float = 0.80         # same fraction for the assumed L2 bandwidth
    l2_usable_fraction: float = 0.80    # of L2 capacity a working set keeps (streamed tiles, other data, hashing)
    vendor_operand_reads: float = 1.0   # cuBLAS-class GEMM: each operand read ~once from HBM
    epilogue_overlap: float = 0.0       # share of the Triton epilogue hidden under MMA (no ping-pong, 1 program/SM)
    small_kernels_per_chunk: int = 1    # sweep: the per-token coefficient kernel, one launch per chunk
    small_kernel_s: float = 4e-6        # GPU time of one tiny kernel


ASSUMPTIONS = Assumptions()


@dataclass(frozen=True)
class Phase:
    """One kernel of a pass (or the same kernel summed over token chunks)."""
    name: str
    flops: float = 0.0          # GEMM FLOPs (tensor cores; the fp32 FMA pipe for fp32 operands)
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0       # SM <-> L2 bytes of a Triton kernel (vendor GEMMs: inside the calibration)
    exps: float = 0.0           # ex2 on the special-function unit
    instructions: float = 0.0   # epilogue thread-instructions (issue slots)
    tail: float = 1.0           # wave quantization: ceil(programs / resident) / (programs / resident)
    fixed_s: float = 0.0        # tiny kernels: a fixed cost each
    mma_dtype: str = ""         # operand dtype of its GEMMs when not the pass's (fp16 grads: fp32 GEMMs)
    detail: Tuple[Tuple[str, float], ...] = ()   # named byte counts, for reading and tests

    def times(self, gpu: GPUSpec, dtype: str, a: Assumptions) -> Dict[str, float]:
        """Seconds of each roofline term: compute (MMA + serial epilogue, with the tail), hbm, l2."""
        clock = gpu.clock_ghz * 1e9 * gpu.sms
        mma = self.flops / (gpu.peak_tflops[self.mma_dtype or dtype] * 1e12 * a.mma_efficiency)
        epilogue = max(self.exps / (gpu.exp_per_clk_per_sm * clock),
                       self.instructions / (gpu.issue_per_clk_per_sm * clock))
        if mma > 0:
            epilogue *= 1.0 - a.epilogue_overlap
        return {"compute": (mma + epilogue) * self.tail,
                "hbm": self.hbm_bytes / (gpu.hbm_tb_s * 1e12 * a.hbm_efficiency),
                "l2": self.l2_bytes / (gpu.l2_tb_s * 1e12 * a.l2_efficiency)}

    def seconds(self, gpu: GPUSpec, dtype: str, a: Assumptions) -> float:
        return max(self.times(gpu, dtype, a).values()) + self.fixed_s


@dataclass(frozen=True)
class PassEstimate:
    """A pass on one GPU: its phases, its GEMM floor, and the memory it needs beyond inputs and outputs."""
    name: str
    gpu: GPUSpec
    dtype: str
    floor_gemms: int
    floor_flops: float          # floor_gemms x 2·N·H·V
    phases: Tuple[Phase, ...]
    extra_bytes: float          # peak bytes alive beyond the inputs and the outputs
    io_bytes: float             # inputs and outputs
    assumptions: Assumptions = field(default=ASSUMPTIONS, repr=False)

    @property
    def seconds(self) -> float:
        return sum(p.seconds(self.gpu, self.dtype, self.assumptions) for p in self.phases)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def floor_seconds(self) -> float:
        return self.floor_flops / (self.gpu.peak_tflops[self.dtype] * 1e12 * self.assumptions.mma_efficiency)

    @property
    def ratio_to_floor(self) -> float:
        return self.seconds / self.floor_seconds

    @property
    def hbm_bytes(self) -> float:
        return sum(p.hbm_bytes for p in self.phases)

    @property
    def l2_bytes(self) -> float:
        return sum(p.l2_bytes for p in self.phases)

    @property
    def bound(self) -> str:
        """The dominant roofline term of the longest phase ("compute", "hbm" or "l2")."""
        longest = max(self.phases, key=lambda p: p.seconds(self.gpu, self.dtype, self.assumptions))
        terms = longest.times(self.gpu, self.dtype, self.assumptions)
        return max(terms, key=terms.get)

    @property
    def fits(self) -> bool:
        return self.io_bytes + self.extra_bytes <= self.gpu.memory_gb * 1e9

    def detail(self) -> Dict[str, float]:
        return {f"{p.name}: {k}": v for p in self.phases for k, v in p.detail}


GPULike = Union[str, GPUSpec]


def get_gpu(gpu: GPULike) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)}")
    return GPUS[gpu]


def known_gpu(device_name: str) -> Optional[str]:
    """The GPUS key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100"), None if not one of them
    (PCIe and NVL parts have other clocks, SM counts and bandwidths)."""
    name = device_name.upper()
    if "H200" in name and "NVL" not in name:
        return "h200"
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return "h100"
    if "A100" in name and "SXM4-80GB" in name:
        return "a100"
    return None
