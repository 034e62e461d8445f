"""A 10-second demo: the ERPO loss and its gradients from random hidden states, with metrics.

    erpo-demo                 # B=16 responses (groups of 8), T=64, H=256, V=32000, fp32, CPU
    erpo-demo --mode grpo --vocab 151936
"""
from __future__ import annotations

import argparse
import time

import torch

from erpo_kernels import ERPOConfig, erpo_loss, token_stats
from erpo_kernels.config import MODES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="erpo", choices=MODES)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, T, H, V = args.batch, args.length, args.hidden, args.vocab
    hidden = torch.randn(B, T, H, device=device, requires_grad=True)
    weight = (torch.randn(V, H, device=device) / H ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=device)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (B,), device=device).float()
    with torch.no_grad():  # old and reference policies: slightly perturbed hidden states
        old = token_stats(hidden + 0.02 * torch.randn_like(hidden), weight, targets, backend=args.backend)
        ref = token_stats(hidden + 0.05 * torch.randn_like(hidden), weight, targets, backend=args.backend)
    start = time.perf_counter()
    out = erpo_loss(hidden, weight, targets, mask, rewards, group_size=args.group_size,
                    old_logprobs=old.logprobs, ref_logprobs=ref.logprobs, old_entropy=old.entropy,
                    config=ERPOConfig(mode=args.mode, kl_beta=0.01), backend=args.backend)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    print(f"mode={args.mode} backend={args.backend} device={device} B={B} T={T} H={H} V={V}")
    print(f"loss = {out.loss.item():.6f}   (forward + backward {elapsed * 1e3:.0f} ms)")
    print(f"|grad hidden| = {hidden.grad.norm():.4e}   |grad weight| = {weight.grad.norm():.4e}")
    for name, value in out.metrics.items():
        print(f"  {name:<24} {value:.6g}")


if __name__ == "__main__":
    main()
