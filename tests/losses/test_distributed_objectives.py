"""Two gloo processes on halves of a global batch give the same losses and the same queues as
one process on the whole batch (keys gathered before enqueue; batch negatives gathered too)."""

import torch
from helpers import identity_grid

from densessl.losses import DenseContrast, GlobalContrast

BATCH, DIM, CELLS, STEPS = 4, 8, 3, 3


def global_batches():
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(STEPS):
        q = torch.randn(BATCH, DIM, CELLS, CELLS, generator=gen)
        k = torch.randn(BATCH, DIM, CELLS, CELLS, generator=gen)
        qg = torch.randn(BATCH, DIM, generator=gen)
        kg = torch.randn(BATCH, DIM, generator=gen)
        valid = torch.ones(BATCH, CELLS, CELLS, dtype=torch.bool)
        steps.append((q, k, qg, kg, valid))
    return steps


def make_objectives():
    # every cell is sampled and enqueued, so the result does not depend on random draws
    dense = DenseContrast(DIM, queue_size=50, temperature=0.3, samples_per_image=CELLS**2,
                          enqueue_per_image=CELLS**2)
    glob = GlobalContrast(DIM, queue_size=6, temperature=0.3)
    return dense.train(), glob.train()


def run_steps(dense, glob, part: slice):
    losses = []
    grid = identity_grid(BATCH, CELLS, CELLS, stride=1)
    for q, k, qg, kg, valid in global_batches():
        ld, _ = dense(q[part], k[part], grid[part], valid[part])
        lg, _ = glob(qg[part], kg[part])
        losses.append(torch.stack([ld.detach(), lg.detach()]))
    return torch.stack(losses), {**{f"dense.{k}": v for k, v in dense.state_dict().items()},
                                 **{f"global.{k}": v for k, v in glob.state_dict().items()}}


def _worker(rank, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=2)
    half = BATCH // 2
    losses, state = run_steps(*make_objectives(), slice(rank * half, (rank + 1) * half))
    torch.save({"losses": losses, "state": state}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")),
                                nprocs=2)
    single_losses, single_state = run_steps(*make_objectives(), slice(0, BATCH))
    results = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    # DDP averages the per-process losses (equal query counts per process)
    mean_losses = (results[0]["losses"] + results[1]["losses"]) / 2
    torch.testing.assert_close(mean_losses, single_losses, atol=1e-5, rtol=1e-5)
    assert (single_losses[1:, 1] > 0).all()  # the global queue really took part
    for result in results:
        assert result["state"].keys() == single_state.keys()
        for name, value in single_state.items():
            torch.testing.assert_close(result["state"][name], value, msg=name)
