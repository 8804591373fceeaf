"""Two real gloo workers: SIA over gathered shards equals SIA over the whole batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.ports import join_process_group, rendezvous_store
from sista_core.losses import SIALoss, gather_with_grad


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def _worker(rank, world_size, port, img, txt, semantics, results):
    join_process_group(port, rank, world_size)
    try:
        local = slice(rank * 3, rank * 3 + 3)
        local_img = img[local].clone().requires_grad_(True)
        local_txt = txt[local].clone().requires_grad_(True)
        gathered = gather_with_grad(local_img)
        out = SIALoss(threshold=0.8, mode="eliminate")(local_img, local_txt, semantics[local])
        out["loss"].backward()
        results[rank] = {
            "gathered": gathered.detach(),
            "loss": out["loss"].detach(),
            "img_grad": local_img.grad,
            "txt_grad": local_txt.grad,
        }
    finally:
        dist.destroy_process_group()


def test_sia_over_two_workers_equals_single_process_global_batch():
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(6, 8, generator=generator)
    txt = img + 0.3 * torch.randn(6, 8, generator=generator)
    semantics = torch.randn(6, 5, generator=generator)
    semantics[4] = semantics[1]  # a false negative that spans the two workers' shards
    results = mp.Manager().dict()
    store = rendezvous_store()
    mp.spawn(_worker, args=(2, store.port, img, txt, semantics, results), nprocs=2)

    full_img, full_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    single = SIALoss(threshold=0.8, mode="eliminate", gather_distributed=False)
    expected = single(full_img, full_txt, semantics)
    assert expected["fraction_eliminated"] > 0
    expected["loss"].backward()
    for rank in (0, 1):
        local = slice(rank * 3, rank * 3 + 3)
        assert torch.allclose(results[rank]["gathered"], img)
        assert torch.allclose(results[rank]["loss"], expected["loss"].detach(), atol=1e-6)
        assert torch.allclose(results[rank]["img_grad"], full_img.grad[local], atol=1e-6)
        assert torch.allclose(results[rank]["txt_grad"], full_txt.grad[local], atol=1e-6)
