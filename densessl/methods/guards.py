"""Divergence guard: a non-finite loss or gradient never trains on silently.

``train.on_nonfinite: stop`` (default) notes the first bad step on the device (no host read per
step) and reads that note every ``train.log_every`` steps, before every checkpoint and at the
end: the run stops with :class:`DivergenceError` and no checkpoint or encoder of the bad state
is written. ``skip_step`` drops the optimiser update of a bad step (every gradient set to
``None``, so neither momentum nor weight decay moves a weight) and counts it; deciding that
needs the flag on the host, one read per step, like AMP's GradScaler. ``log_every`` bad steps
in a row stop the run all the same.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from densessl.errors import DensesslError


class DivergenceError(DensesslError):
    """Training produced a non-finite loss or gradient."""


class NonFiniteGuard(pl.Callback):
    def __init__(self, mode: str = "stop", check_every: int = 10) -> None:
        if mode not in ("stop", "skip_step"):
            raise ValueError(f"on_nonfinite: expected stop or skip_step, got {mode!r}")
        self.mode, self.check_every = mode, max(1, int(check_every))
        self.skipped = 0
        self._consecutive = 0
        self._first_bad: torch.Tensor | None = None  # device scalar, -1 while all is finite

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        loss = pl_module.last_stats.get("loss")
        finite = loss.isfinite() if loss is not None else torch.ones((), dtype=torch.bool)
        # With a GradScaler (fp16) inf gradients are the scaler's business: it skips them.
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            finite = finite.to(grads[0].device) & torch.stack(
                torch._foreach_norm(grads)).isfinite().all()
        if self.mode == "skip_step":
            if bool(finite):  # host read: skipping is a host decision
                self._consecutive = 0
                return
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            self._consecutive += 1
            if self._consecutive >= self.check_every:  # skipping is not getting anywhere
                raise DivergenceError(
                    f"training diverged: {self._consecutive} steps in a row up to step "
                    f"{trainer.global_step} had a non-finite loss or gradient and were "
                    "skipped (train.on_nonfinite: skip_step); lower train.lr or raise "
                    "train.warmup_steps")
            return
        step = torch.full((), trainer.global_step, dtype=torch.long, device=finite.device)
        if self._first_bad is None or self._first_bad.device != finite.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=finite.device)
        self._first_bad = torch.where((self._first_bad < 0) & ~finite, step, self._first_bad)

    def check(self, trainer) -> None:
        """Raise if a step since the last check was non-finite (reads one device scalar)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first >= 0:
            raise DivergenceError(
                f"training diverged: non-finite loss or gradient at step {first} (noticed at "
                f"step {trainer.global_step}); no checkpoint or encoder of it was written. Lower "
                "train.lr, raise train.warmup_steps, or set train.on_nonfinite: skip_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.check_every == 0 or step >= trainer.max_steps:
            self.check(trainer)
