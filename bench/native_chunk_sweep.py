"""Time and peak memory of the native backend's training pass against its chunk size (tokens per [chunk, V]
buffer), at one shape, to choose the CPU chunk rule (erpo_kernels.backends.torch_chunked.cpu_chunk_rows).

    python bench/native_chunk_sweep.py [--shape 8x128,896,151936] [--chunks 64,128,256,512,1024] [--threads 2]
                                       [--paths one_sweep,two_pass] [--backend native]

Prints a markdown table: chunk ("auto": the backend's own rule), path (one_sweep: old entropy given, 3 GEMMs;
two_pass: stats pass, then its backward recomputes the logits, 4 GEMMs), dtype, median ms of ``--repeats`` after
1 warm-up, peak extra MiB (RSS high-water mark above the RSS before the call; the gradients are already
allocated by the warm-up calls, so this is the loss's own working memory).
"""
import argparse
import dataclasses

import torch

from erpo_kernels import erpo_loss
from erpo_kernels.benchmark.common import median, parse_shape, peak_extra_bytes, time_callable
from erpo_kernels.benchmark.contenders import make_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8x128,896,151936")
    parser.add_argument("--chunks", default="64,128,256,512,1024")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default="one_sweep")
    parser.add_argument("--backend", default="native")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, cpu = parse_shape(args.shape), torch.device("cpu")
    print(f"| chunk | path | dtype | median ms | peak extra MiB |\n|---:|---|---|---:|---:|")
    for dtype_name in args.dtypes.split(","):
        inp = make_inputs(shape, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name], cpu)
        for chunk, path in [(c, p) for c in [int(c) for c in args.chunks.split(",") if c] + [None]
                            for p in args.paths.split(",")]:
            config = dataclasses.replace(inp.config, chunk_size=chunk)
            old_entropy = inp.old_entropy if path == "one_sweep" else None

            def run():
                inp.zero_grads()
                out = erpo_loss(inp.hidden, inp.weight, inp.targets, inp.mask, inp.rewards,
                                group_size=inp.group_size, old_logprobs=inp.old_logprobs,
                                ref_logprobs=inp.ref_logprobs, old_entropy=old_entropy, config=config,
                                backend=args.backend)
                out.loss.backward()

            ms = median(time_callable(run, cpu, warmup=1, repeats=args.repeats))
            peak = peak_extra_bytes(run, cpu) / 2 ** 20
            print(f"| {chunk or 'auto'} | {path} | {dtype_name} | {ms:,.0f} | {peak:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
