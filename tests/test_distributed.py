"""gate_scope="global" across real torch.distributed ranks (gloo on CPU, 2 processes).

Each rank holds half of the groups; the global gate on the shards must equal the "batch" gate of
one process holding the whole batch, and so must the advantages and the loss gradients.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erpo_kernels import erpo_advantages, erpo_loss
from tests.helpers import assert_close, make_batch, small_config, triton_device

WORLD = 2


def _worker(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch = make_batch(B=8, T=12, seed=3)
        rows = slice(rank * 4, (rank + 1) * 4)       # one group of 4 per rank
        config = small_config(gate_scope="global")
        adv = erpo_advantages(batch["rewards"][rows], batch["mask"][rows], batch["old_entropy"][rows],
                              batch["old_logprobs"][rows], batch["ref_logprobs"][rows], group_size=4,
                              config=config)
        for backend, device in (("chunked", "cpu"), ("triton", triton_device())):
            on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            weight = on["weight"].clone().requires_grad_()
            out = erpo_loss(on["hidden"][rows], weight, on["targets"][rows], on["mask"][rows],
                            on["rewards"][rows], group_size=4, old_logprobs=on["old_logprobs"][rows],
                            ref_logprobs=on["ref_logprobs"][rows], old_entropy=on["old_entropy"][rows],
                            config=config.replace(aggregation="seq_mean_token_sum"), backend=backend)
            out.loss.backward()
            results[f"{rank}/{backend}/grad_weight"] = weight.grad.cpu().clone()
        results[f"{rank}/gate"] = adv.gate.clone()
        results[f"{rank}/advantages"] = adv.advantages.clone()
    finally:
        dist.destroy_process_group()


def test_global_gate_equals_single_process_batch_gate(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)

    batch = make_batch(B=8, T=12, seed=3)
    config = small_config(gate_scope="batch")
    full = erpo_advantages(batch["rewards"], batch["mask"], batch["old_entropy"], batch["old_logprobs"],
                           batch["ref_logprobs"], group_size=4, config=config)
    gate = torch.cat([results[f"{r}/gate"] for r in range(WORLD)])
    advantages = torch.cat([results[f"{r}/advantages"] for r in range(WORLD)])
    local = erpo_advantages(batch["rewards"][:4], batch["mask"][:4], batch["old_entropy"][:4], group_size=4,
                            config=config)
    assert not torch.allclose(local.gate, full.gate[:4])  # the test can tell local from global statistics
    assert_close(gate, full.gate, rtol=1e-6, atol=1e-7, name="gate")
    assert_close(advantages, full.advantages, rtol=1e-6, atol=1e-7, name="advantages")

    # seq_mean_token_sum divides by the rows of each rank: the sum of the ranks' gradients is the
    # whole batch's gradient times the world size
    weight = batch["weight"].clone().requires_grad_()
    out = erpo_loss(batch["hidden"], weight, batch["targets"], batch["mask"], batch["rewards"], group_size=4,
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                    old_entropy=batch["old_entropy"], config=config.replace(aggregation="seq_mean_token_sum"))
    out.loss.backward()
    for backend in ("chunked", "triton"):
        summed = sum(results[f"{r}/{backend}/grad_weight"] for r in range(WORLD))
        assert_close(summed, weight.grad * WORLD, rtol=1e-5, atol=1e-5, scaled=True, name=f"{backend} grad_weight")
