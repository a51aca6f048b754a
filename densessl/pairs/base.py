"""The PairBuilder interface: a map-style dataset of :class:`~densessl.contract.PairSample`.

A builder runs on the CPU in DataLoader workers. It only decides *which* two source images form a
positive pair and how their pixels correspond (the base correspondence); each view's own geometry
and photometry is sampled later on the device by :mod:`densessl.augment`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch.utils.data import Dataset

from densessl.contract import PairSample


class PairBuilder(Dataset, ABC):
    """Base class of every positive-pair builder.

    Subclasses implement ``__len__`` and ``build(index) -> PairSample``. ``__getitem__`` calls
    :meth:`build` and validates the result against the contract, so a mistake in a custom
    builder is reported with the builder's name and the offending field.
    """

    #: registry name, set by :func:`densessl.pairs.registry.register_pair_builder`
    name: str = "custom"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def build(self, index: int) -> PairSample:
        """Return the positive pair number ``index``."""

    def __getitem__(self, index: int) -> PairSample:
        from densessl.pairs.validation import validate_pair_sample

        sample = self.build(index)
        validate_pair_sample(sample, builder=type(self).__name__)
        return sample
