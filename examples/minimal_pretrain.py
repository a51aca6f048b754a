"""Dense contrastive pretraining in plain PyTorch: no recipe, no Lightning, every piece visible.

Run: ``python examples/minimal_pretrain.py --steps 20``.

The library's pieces, in data-flow order (docs/architecture.md):

* a **pair builder** (``same_image``, from the registry) over the **synthetic source**;
* **collate** (:func:`densessl.pairs.collate_pairs`): ``list[PairSample]`` → ``SourceBatch``;
* the **view augmentation** (:class:`densessl.augment.views.ViewAugmentation`): two views per
  pair and the exact correspondence ``grid_ab`` / ``valid_ab`` between them;
* the **encoder** (:class:`densessl.models.dense_encoder.DenseEncoder`, ResNet-18 + FPN +
  dense head) and its **momentum twin** (:class:`densessl.models.momentum.MomentumPair`);
* one **objective**: InfoNCE (:func:`densessl.losses.functional.info_nce`) between a cell of
  view A and the same scene point of view B, with the other images' keys as negatives.

What ``densessl pretrain`` adds on top: recipes, MoCo queues, instance and global objectives,
mixed precision, checkpoints, resume, several GPUs and an exported ``encoder.pt``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from densessl.augment.views import ViewAugmentation
from densessl.cells import image_to_feature_grid
from densessl.data.synthetic import SyntheticScenes
from densessl.losses.functional import info_nce
from densessl.models.dense_encoder import DenseEncoder
from densessl.models.momentum import MomentumPair, cosine_momentum
from densessl.pairs import collate_pairs, get_pair_builder


def dense_contrast(q_dense, k_dense, grid_ab, valid_ab, stride, alignment, cells=32,
                   temperature=0.2):
    """InfoNCE over up to ``cells`` valid cells of view A per image: the positive is view B's
    feature at the same scene point (read at ``grid_ab``), negatives the other images' keys."""
    b, d, h, w = q_dense.shape
    # a random subset of each image's valid cells (scores of invalid cells are −1, never drawn)
    scores = torch.rand(b, h * w, device=valid_ab.device).masked_fill(~valid_ab.flatten(1), -1)
    top = scores.topk(min(cells, h * w), dim=1)
    keep = (top.values >= 0).flatten()
    image = torch.arange(b, device=q_dense.device)[:, None].expand_as(top.indices).flatten()
    cell = top.indices.flatten()
    query = q_dense.flatten(2)[image, :, cell]                                # N×D
    # view-B position of each chosen cell → coordinates on B's feature map (cells.py)
    grid = grid_ab.flatten(1, 2)[image, cell]                                 # N×2
    kh, kw = k_dense.shape[2:]
    grid = image_to_feature_grid(grid, (kh * stride, kw * stride), (kh, kw), stride, alignment)
    key = F.grid_sample(k_dense[image], grid[:, None, None, :].to(k_dense.dtype),
                        align_corners=False, padding_mode="border")[:, :, 0, 0]  # N×D
    query, key = F.normalize(query[keep], dim=1), F.normalize(key[keep], dim=1)
    image = image[keep]
    other_image = image[:, None] != image[None, :]  # same-image cells are near-duplicates
    return info_nce(query, key, negatives=key, temperature=temperature, neg_mask=other_image)


def main(steps: int = 20, batch_size: int = 8, image_size: int = 96, view_size: int = 64,
         lr: float = 0.03, momentum: float = 0.99, seed: int = 0, device: str = "cpu",
         on_step: Callable | None = None) -> dict:
    """Train for ``steps`` steps; returns ``{"losses": [...], "model": MomentumPair}``.

    ``on_step(step, loss, m, model)`` (optional) is called after the optimizer step and just
    before the momentum update with ``m``.
    """
    torch.manual_seed(seed)
    source = SyntheticScenes(num_images=max(4 * batch_size, 16), image_size=image_size)
    pairs = get_pair_builder("same_image")(source)                    # registry → builder class
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate_pairs)

    encoder = DenseEncoder("resnet18", in_channels=3, dense_stride=8, global_head=False,
                           pyramid="dense")
    model = MomentumPair(encoder).to(device)
    augment = ViewAugmentation(channels=3, view_size=view_size, grid_stride=encoder.stride,
                               cell_alignment=encoder.cell_alignment,
                               photometry={"blur_p": 0.0}).to(device)
    optimizer = torch.optim.SGD(model.online.parameters(), lr=lr, momentum=0.9,
                                weight_decay=1e-4)

    losses: list[float] = []
    step = 0
    while step < steps:
        for source_batch in loader:
            if step >= steps:
                break
            batch = augment(source_batch.to(device))                  # SourceBatch → PairBatch
            q_dense = model.encode(batch.view_a, "online")["dense"]
            k_dense = model.encode(batch.view_b, "momentum")["dense"]
            loss = dense_contrast(q_dense, k_dense, batch.grid_ab, batch.valid_ab,
                                  encoder.stride, encoder.cell_alignment)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            m = cosine_momentum(step, steps, start=momentum)
            if on_step is not None:
                on_step(step, loss, m, model)
            model.update(m)                        # momentum ← m·momentum + (1 − m)·online
            losses.append(loss.item())
            print(f"step {step:4d}  loss {loss.item():.4f}  momentum {m:.4f}")
            step += 1
    return {"losses": losses, "model": model}


def cli(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--view-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return main(steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
                view_size=args.view_size, lr=args.lr, momentum=args.momentum, seed=args.seed,
                device=args.device)


if __name__ == "__main__":
    cli()
