"""Two real gloo workers with DDP: every loss term trains the parameters with exactly the
gradient of the same loss over the global batch in one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from components.platform.ports import join_process_group, rendezvous_store
from sista_core.losses import IntraLoss, SIALoss, STALoss, gather_with_grad, mean_over_workers

WORLD_SIZE, LOCAL_BATCH, DIM = 2, 3, 8
TERMS = ("sia:eliminate", "sia:positive", "sia:soft", "sia:none", "intra", "sta")


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


class LossTerms(nn.Module):
    """Projections in front of each loss term: the parameters whose gradients DDP averages."""

    def __init__(self, gather_distributed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(DIM, 6), nn.Linear(DIM, 6)
        self.words, self.patches = nn.Linear(DIM, 6), nn.Linear(DIM, 6)
        options = {"gather_distributed": gather_distributed}
        # Temperatures differ from sigma, so a swapped argument would show.
        self.sia = {
            mode: SIALoss(
                temperature=0.2, threshold=0.8, mode=mode, alpha=0.4, sigma=0.3, **options
            )
            for mode in ("eliminate", "positive", "soft", "none")
        }
        self.intra = IntraLoss(temperature=0.2, sigma=0.3, **options)
        self.sta = STALoss(temperature_attn=0.1, temperature_local=0.2)

    def forward(self, term: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        img, txt = self.image(batch["img"]), self.text(batch["txt"])
        if term.startswith("sia:"):
            return self.sia[term.removeprefix("sia:")](img, txt, batch["semantics"])["loss"]
        if term == "intra":
            return self.intra(img, batch["semantics"])
        words, patches = self.words(batch["words"]), self.patches(batch["patches"])
        return self.sta(words, batch["word_mask"], patches)["loss"]


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = WORLD_SIZE * LOCAL_BATCH

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    img = normal(size, DIM)
    semantics = normal(size, 5)
    semantics[4] = semantics[1]  # a false negative that spans the two workers' shards
    word_mask = torch.ones(size, 4, dtype=torch.bool)
    word_mask[0, 3] = word_mask[5, 2:] = False
    return {
        "img": img,
        "txt": img + 0.3 * normal(size, DIM),
        "semantics": semantics,
        "words": normal(size, 4, DIM),
        "word_mask": word_mask,
        "patches": normal(size, 5, DIM),
    }


def _worker(rank: int, port: int, batch: dict, results) -> None:
    join_process_group(port, rank, WORLD_SIZE)
    try:
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        shard = {name: tensor[local] for name, tensor in batch.items()}
        gathered = gather_with_grad(shard["img"])
        found = {"gathered": gathered}
        for term in TERMS:
            model = DistributedDataParallel(LossTerms(True), find_unused_parameters=True)
            loss = model(term, shard)
            loss.backward()
            found[term] = {
                "loss": loss.detach(),
                "logged": mean_over_workers(loss),
                "grads": {
                    n: p.grad.clone()
                    for n, p in model.module.named_parameters()
                    if p.grad is not None
                },
            }
        results[rank] = found
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers() -> tuple[dict, dict]:
    batch = global_batch()
    store = rendezvous_store()
    with mp.Manager() as manager:  # its server process stops with the block
        results = manager.dict()
        mp.spawn(_worker, args=(store.port, batch, results), nprocs=WORLD_SIZE)
        return batch, dict(results)


def test_workers_gather_the_global_batch_in_rank_order(two_workers):
    batch, results = two_workers
    for rank in range(WORLD_SIZE):
        assert torch.equal(results[rank]["gathered"], batch["img"])


@pytest.mark.parametrize("term", TERMS)
def test_parameter_gradients_after_ddp_equal_the_global_batch_gradient(two_workers, term):
    batch, results = two_workers
    single = LossTerms(gather_distributed=False)
    expected_loss = single(term, batch)
    expected_loss.backward()
    expected = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert expected, f"{term} trains no parameter"
    for rank in range(WORLD_SIZE):
        found = results[rank][term]
        assert set(found["grads"]) == set(expected)
        for name, gradient in expected.items():
            assert torch.allclose(found["grads"][name], gradient, atol=1e-6, rtol=1e-5), (
                f"{term}: rank {rank}'s DDP gradient of {name} is "
                f"{(found['grads'][name].norm() / gradient.norm()).item():.3f}x the global one"
            )
        if term != "sta":  # gathered terms: each worker computes the global-batch loss
            assert torch.allclose(found["loss"], expected_loss.detach(), atol=1e-6)
        # What pre-training logs: the mean over workers, for per-pair terms too.
        assert torch.allclose(found["logged"], expected_loss.detach(), atol=1e-6)
