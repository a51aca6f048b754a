"""mask_edge_boxes: torchvision's masks_to_boxes moved to COCO edges (x2 = last pixel + 1)."""

import torch

from densessl.boxes import mask_edge_boxes


def test_edge_boxes_match_the_pixel_extent_and_empty_masks_are_zero():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 13, 17, generator=gen) > 0.97
    masks[3] = False
    boxes = mask_edge_boxes(masks)
    for mask, box in zip(masks, boxes):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        want = ([0.0] * 4 if xs.numel() == 0 else
                [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
        assert box.tolist() == want
    assert boxes[3].tolist() == [0.0] * 4
    assert mask_edge_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)
