"""Peak extra memory of the chunked backend, measured as the peak-RSS delta of a fresh process."""
import json
import subprocess
import sys
import textwrap

import pytest

from erpo_kernels.backends.torch_chunked import resolve_chunk_size

N, H, V = 8192, 64, 32000
FULL_LOGITS_BYTES = N * V * 4          # one fp32 [N, V] tensor: 1.05 GB
# The chunked backend's design: two fp32 [chunk, V] buffers (logits/dz and scratch), nothing else of that
# size.  Measured (2-core CPU, 2026-11-25): 60 MiB extra on both paths, for 64 MiB of buffers.  The bound is
# 1.5x the buffers, so a third buffer or per-chunk temporaries fail the test.
BUFFER_BYTES = 2 * resolve_chunk_size(None, V) * V * 4
LIMIT_BYTES = 1.5 * BUFFER_BYTES

SCRIPT = textwrap.dedent(f"""
    import json, resource, torch
    from erpo_kernels import erpo_loss, ERPOConfig
    torch.manual_seed(0)
    B, T = 64, {N} // 64
    hidden = torch.randn(B, T, {H}, requires_grad=True)
    weight = (torch.randn({V}, {H}) / 8).requires_grad_()
    targets = torch.randint(0, {V}, (B, T))
    mask = torch.rand(B, T) > 0.1
    rewards = torch.randint(0, 2, (B,)).float()
    old_lp, old_h = -torch.rand(B, T) * 5, torch.rand(B, T) * 3
    # warm up the code paths on a tiny problem so library loading is not counted
    erpo_loss(hidden[:8, :4], weight[:100], targets[:8, :4] % 100, mask[:8, :4], rewards[:8], group_size=8,
              backend="{{backend}}").loss.backward()
    hidden.grad = weight.grad = None
    weight.grad = torch.empty_like(weight); weight.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = erpo_loss(hidden, weight, targets, mask, rewards, group_size=8, old_logprobs=old_lp,
                    old_entropy=old_h if {{fused}} else None, backend="{{backend}}")
    out.loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the gradients are outputs the caller keeps: count them as inputs-sized, not as extra
    grads = hidden.grad.numel() * 4 + weight.grad.numel() * 4
    print(json.dumps(dict(extra=after - before - grads, loss=float(out.loss))))
""")


def _peak_extra(backend: str, fused: bool = True) -> dict:
    script = SCRIPT.replace("{backend}", backend).replace("{fused}", str(fused))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["one_sweep", "stats_then_backward"])
def test_chunked_peak_memory_is_its_two_chunk_buffers(fused):
    chunked = _peak_extra("chunked", fused)
    assert chunked["extra"] < LIMIT_BYTES, (
        f"chunked backend used {chunked['extra'] / 2**20:.0f} MiB extra at N={N}, V={V}; "
        f"limit {LIMIT_BYTES / 2**20:.0f} MiB (1.5x its two [chunk, V] buffers)")
    assert LIMIT_BYTES < FULL_LOGITS_BYTES / 10


@pytest.mark.slow
def test_measurement_sees_full_logits():
    """The same measurement on the full-logits backend must see at least one [N, V] tensor: the
    probe is not blind."""
    full = _peak_extra("torch")
    assert full["extra"] > FULL_LOGITS_BYTES
