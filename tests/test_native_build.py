"""The native extension as a build product: built wherever a compiler is (CI must not skip its tests), a clear
error where it is not, "auto" picking it on the CPU, argument errors that name the argument, every instruction
set build agreeing, results independent of the thread count, and the CPU chunk sizing rule."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from erpo_kernels import token_stats
from erpo_kernels.backends import native_unavailable, resolve_backend_name
from erpo_kernels.backends.torch_chunked import MIN_CPU_ROWS, available_host_bytes, cpu_chunk_rows
from tests.helpers import assert_close, make_linear_inputs

COMPILER = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
needs_native = pytest.mark.skipif(COMPILER is None and native_unavailable() is not None,
                                  reason="no C++ compiler here, so no native extension")


def test_built_wherever_a_compiler_is():
    """`pip install -e .` builds the extension where a C++ compiler exists: there a missing build is a failure,
    not a skip (CI runs on such a machine).  Without one, backend='native' says why."""
    reason = native_unavailable()
    if COMPILER is None:
        assert reason is not None and "compiler" in reason, reason
    else:
        assert reason is None, reason


@needs_native
def test_auto_picks_native_on_the_cpu():
    assert resolve_backend_name("auto", torch.device("cpu")) == "native"
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_backend_name("native", torch.device("meta"))


def test_a_missing_extension_says_why():
    """Without the compiled module, backend='native' raises a ValueError that says it is not built and why, and
    the package still imports and runs on the chunked backend ('auto' falls back)."""
    script = textwrap.dedent("""
        import json, sys, torch
        sys.modules["erpo_kernels._native"] = None          # as if the build had been skipped
        from erpo_kernels import token_stats
        from erpo_kernels.backends import get_backend, resolve_backend_name
        try:
            get_backend("native", torch.device("cpu"))
            message = None
        except ValueError as error:
            message = str(error)
        st = token_stats(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3]))
        print(json.dumps(dict(message=message, auto=resolve_backend_name("auto", torch.device("cpu")),
                              finite=bool(torch.isfinite(st.logprobs).all()))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["message"].startswith("backend='native': the compiled extension erpo_kernels._native is not built")
    assert "backend='chunked'" in out["message"] and ("compiler" in out["message"])
    assert out["auto"] == "chunked" and out["finite"]


@needs_native
def test_operator_errors_name_the_argument():
    ops = torch.ops.erpo_native
    logits, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, -100])
    lse, entropy = torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="logits: unsupported dtype"):
        ops.chunk_stats(logits.half(), targets, -100)
    with pytest.raises(RuntimeError, match=r"targets: row 2 has id 10, expected one in \[0, 10\)"):
        ops.chunk_stats(logits, torch.tensor([0, 1, 10, 3]), -100)
    with pytest.raises(RuntimeError, match="targets: expected shape"):
        ops.chunk_stats(logits, targets[:3], -100)
    with pytest.raises(RuntimeError, match="lse: expected Double"):
        ops.chunk_dz_(logits.double(), targets, lse, entropy.double(), None, None, -100, 1.0)
    with pytest.raises(RuntimeError, match="temperature: expected > 0"):
        ops.chunk_dz_(logits, targets, lse, entropy, None, None, -100, 0.0)
    if ops.has_bf16_gemm():
        a, b = torch.randn(3, 4).bfloat16(), torch.randn(5, 2).bfloat16()
        with pytest.raises(RuntimeError, match="b: expected 4 rows"):
            ops.gemm_bf16_f32(a, b, torch.empty(3, 2), 1.0, 0.0)
        with pytest.raises(RuntimeError, match="weight: expected"):
            ops.chunk_logits_bf16(a, b, None, torch.zeros(3, dtype=torch.long), -100, 1.0, None,
                                  torch.empty(3, 5, dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match="shifts: bf16 logits come with"):
            ops.chunk_dz_(logits.bfloat16(), targets, lse, entropy, None, None, -100, 1.0)


ISA_SCRIPT = textwrap.dedent("""
    import json, torch
    from erpo_kernels import token_stats
    from erpo_kernels.backends import native
    from tests.helpers import make_linear_inputs
    out = {"isa": native.capability()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hidden, weight, bias, targets = make_linear_inputs(37, 24, 301, dtype=dtype, ignore_every=5)
        h, w = hidden.requires_grad_(), weight.requires_grad_()
        st = token_stats(h, w, targets, 0.8, bias=bias, backend="native", chunk_size=16)
        (st.logprobs.sum() + 0.5 * st.entropy.sum()).backward()
        out[name] = [x.detach().double().flatten().tolist() for x in (st.logprobs, st.entropy, h.grad, w.grad)]
    print(json.dumps(out))
""")


def _run_with_capability(capability=None) -> dict:
    env = dict(__import__("os").environ)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    result = subprocess.run([sys.executable, "-c", ISA_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_native
def test_every_instruction_set_build_agrees():
    """The row kernels are compiled for the baseline, AVX2 and AVX-512 and picked at run time like torch's own
    kernels (ATEN_CPU_CAPABILITY forces a lower one): every build gives the same statistics and gradients."""
    best = _run_with_capability()
    for capability in ("avx2", "default"):
        other = _run_with_capability(capability)
        assert other["isa"] in ("AVX2", "DEFAULT")
        for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
            for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), best[dtype], other[dtype]):
                assert_close(torch.tensor(a), torch.tensor(b), rtol=tol, atol=tol, scaled=name.startswith("grad"),
                             name=f"{other['isa']} vs {best['isa']} {dtype} {name}")


@needs_native
def test_statistics_do_not_depend_on_the_thread_count():
    hidden, weight, _, targets = make_linear_inputs(301, 32, 2000, ignore_every=9)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(token_stats(hidden, weight, targets, backend="native", chunk_size=64))
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("logprobs", "entropy", "lse"), *results):
        assert_close(a, b, rtol=1e-6, atol=1e-6, name=name)


def test_cpu_chunk_rows_rule():
    """Rows from V, H and the free memory: a share of what the [V, H] accumulator leaves, capped, at least
    MIN_CPU_ROWS while they fit, never more than the tokens."""
    gib = 1024 ** 3
    qwen = dict(vocab=151936, hidden_size=896)
    assert cpu_chunk_rows(**qwen, n_tokens=1024, available=20 * gib) == 1024
    assert cpu_chunk_rows(**qwen, n_tokens=100, available=20 * gib) == 100
    big = cpu_chunk_rows(**qwen, n_tokens=10 ** 6, available=20 * gib)
    assert MIN_CPU_ROWS <= big and big * 151936 * 4 <= gib
    assert abs(cpu_chunk_rows(**qwen, n_tokens=10 ** 6, available=20 * gib, element_bytes=2) - 2 * big) <= 1
    tight = cpu_chunk_rows(**qwen, n_tokens=10 ** 6, available=gib)
    assert tight == MIN_CPU_ROWS          # a share would give fewer rows; the minimum still fits
    assert cpu_chunk_rows(**qwen, n_tokens=10 ** 6, available=600 * 2 ** 20) < MIN_CPU_ROWS
    assert cpu_chunk_rows(vocab=1, hidden_size=1, n_tokens=0, available=gib) == 1
    assert cpu_chunk_rows(**qwen, n_tokens=10 ** 6, available=20 * gib, max_rows=384) == 384
    assert cpu_chunk_rows(**qwen, n_tokens=100, available=20 * gib, max_rows=384) == 100


def test_native_chunk_rows_by_dtype():
    """The native backend's choice at the 0.5B lm_head, N = 1024: fp32 capped at FP_CHUNK_ROWS (more rows buy no
    time), bf16 one chunk while the budget holds it (grad_weight written in bf16, no fp32 accumulator)."""
    native = pytest.importorskip("erpo_kernels.backends.native", exc_type=ValueError)
    free = available_host_bytes()
    if free is not None and free < 4 * 1024 ** 3:
        pytest.skip("needs 4 GiB of free host memory for the budget to hold a whole bf16 chunk")
    weight = torch.empty(151936, 896)
    hidden = torch.empty(1024, 896)
    assert native.NativeSteps.chunk_rows(None, hidden, weight) == native.FP_CHUNK_ROWS
    assert native.NativeSteps.chunk_rows(None, hidden.double(), weight.double()) == native.FP_CHUNK_ROWS
    if native.BF16_GEMM:
        assert native.NativeSteps.chunk_rows(None, hidden.bfloat16(), weight.bfloat16()) == 1024
    assert native.NativeSteps.chunk_rows(77, hidden, weight) == 77


def test_setup_without_a_compiler_still_succeeds(tmp_path):
    """setup.py with a C++ compiler that fails (CC=CXX=/bin/false, as on a machine without one): the build step
    exits 0, warns why the extension was not built, and leaves no extension behind; ERPO_BUILD_NATIVE=1 makes
    the same failure fatal."""
    root = Path(__file__).resolve().parents[1]
    for name in ("setup.py", "pyproject.toml", "README.md", "csrc"):
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, tmp_path / name)
    (tmp_path / "erpo_kernels").mkdir()
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false"}
    env.pop("ERPO_BUILD_NATIVE", None)
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the native extension was not built" in result.stderr
    assert not list((tmp_path / "erpo_kernels").glob("_native*"))
    strict = subprocess.run(command, cwd=tmp_path, env={**env, "ERPO_BUILD_NATIVE": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert strict.returncode != 0
