"""DINO / Co-DINO under DDP (2 gloo processes on the CPU): each rank builds its own number of denoising
groups from its own images, one rank may have no ground truth at all (no denoising queries, no positives),
and the training steps still complete with every parameter reduced and the replicas equal."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codetr.config import apply_overrides, get_preset
from codetr.data.collate import Batch
from codetr.engine.train import train_step
from codetr.models.criterion import build_criterion
from codetr.models.detector import build_detector

SMALL = ["data.num_workers=0", "data.batch_size=2", "model.num_queries=12", "model.num_detections=12",
         "model.denoising.num_queries=6", "model.transformer.num_encoder_layers=1"]


def rank_batch(rank: int) -> Batch:
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    counts = (1, 3) if rank == 0 else (0, 0)  # rank 1: no ground truth at all
    targets = []
    for n in counts:
        boxes = torch.cat((torch.rand(n, 2, generator=generator) * 0.5 + 0.25, torch.rand(n, 2, generator=generator) * 0.3 + 0.1), 1)
        targets.append({"boxes": boxes, "labels": torch.randint(3, (n,), generator=generator)})
    return Batch(images, masks, targets)


def worker(rank: int, world_size: int, port: int, preset: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = apply_overrides(get_preset(preset), SMALL)
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    criterion = build_criterion(model, cfg.model)
    for _ in range(2):  # an unreduced parameter in step 1 would fail DDP in step 2
        train_step(ddp, criterion, rank_batch(rank), optimizer, cfg)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dino_tiny", "co_dino_tiny"])
def test_ddp_steps_with_a_rank_without_ground_truth(preset, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, preset, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    initial = build_detector(apply_overrides(get_preset(preset), SMALL).model, num_classes=3).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # the replicas stayed equal
    assert not torch.equal(first["denoising.label_embedding.weight"], initial["denoising.label_embedding.weight"])
