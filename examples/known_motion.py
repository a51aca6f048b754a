"""Two frames related by a known camera motion (a homography), correspondence from it.
Run: ``densessl pretrain examples/known_motion.yaml --out runs/known_motion``.
"""

import kornia
import torch

from densessl.contract import PairSample
from densessl.pairs import PairBuilder, register_pair_builder
from densessl.pairs.correspondence import homography_correspondence


@register_pair_builder("known_motion")
class KnownMotionPairs(PairBuilder):
    """Frame B is frame A seen by a camera that moved: shift, rotation, zoom, slight tilt."""

    def __init__(self, dataset, max_shift: float = 0.15, max_degrees: float = 10.0,
                 max_tilt: float = 5e-4, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.max_shift, self.max_degrees, self.max_tilt = max_shift, max_degrees, max_tilt

    def __len__(self):
        return len(self.dataset)

    def motion(self, index: int, height: int, width: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 104729 + index)
        u = torch.rand(6, generator=gen) * 2 - 1
        angle = torch.deg2rad(u[0] * self.max_degrees)
        zoom = 1 + 0.1 * u[1]
        cx, cy = (width - 1) / 2, (height - 1) / 2
        c, s = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        tx = cx - c * cx + s * cy + u[2] * self.max_shift * width
        ty = cy - s * cx - c * cy + u[3] * self.max_shift * height
        return torch.tensor([[c, -s, tx], [s, c, ty],
                             [u[4] * self.max_tilt, u[5] * self.max_tilt, 1.0]])

    def build(self, index: int) -> PairSample:
        frame_a = self.dataset[index]["image"]
        _, height, width = frame_a.shape
        motion = self.motion(index, height, width)             # frame-A pixel → frame-B pixel
        frame_b = kornia.geometry.warp_perspective(frame_a[None], motion[None], (height, width),
                                                   align_corners=True)[0]
        seen = kornia.geometry.warp_perspective(torch.ones(1, 1, height, width), motion[None],
                                                (height, width), align_corners=True)[0, 0]
        grid, valid = homography_correspondence(motion, (height, width), (height, width))
        return PairSample(source_a=frame_a, source_b=frame_b, valid_b=seen > 0.999,
                          base_grid=grid, base_valid=valid, meta={"index": index})
