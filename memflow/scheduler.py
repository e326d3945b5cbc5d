"""Flow matching with a timestep shift: the noise schedule, the warped step list, x0 <-> flow."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class FlowMatchScheduler:
    """x_t = (1 - sigma) x0 + sigma * noise; the model predicts the flow noise - x0.

    Timesteps live on [0, 1000]; sigma(t) is looked up on the 1000-entry training grid, as the
    reference does, so that every conversion uses exactly the reference's sigmas.
    """

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift = shift
        self.num_train_timesteps = n = num_train_timesteps
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * n
        y = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        y = y - y.min()
        self.linear_timesteps_weights = y * (n / y.sum())
        self._grids: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _grid(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) on ``device``, copied once so the sampling loop never copies."""
        if device not in self._grids:
            self._grids[device] = (self.timesteps.to(device), self.sigmas.to(device))
        return self._grids[device]

    def warp(self, steps: Sequence[float]) -> torch.Tensor:
        """Map nominal steps (e.g. 1000, 750, 500, 250) onto the shifted schedule."""
        grid = torch.cat([self.timesteps, torch.zeros(1)])
        idx = torch.tensor([self.num_train_timesteps - int(s) for s in steps])
        if (idx < 0).any() or (idx > self.num_train_timesteps).any():
            raise ValueError(f"denoising steps must lie in [0, {self.num_train_timesteps}], got {list(steps)}")
        return grid[idx]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma for timesteps t (any shape), from the nearest grid timestep."""
        grid, sigmas = self._grid(t.device)
        idx = (grid[None] - t.reshape(-1, 1).float()).abs().argmin(dim=1)
        return sigmas[idx].reshape(t.shape)

    @staticmethod
    def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise x0 to timesteps t (shape [B] or [B, F] for latents [B, F, C, H, W])."""
        sigma = self._bcast(self.sigma(t), x0)
        return ((1 - sigma) * x0 + sigma * noise).to(x0.dtype)

    def flow_to_x0(self, flow: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma * flow, computed in float64 like the reference."""
        sigma = self._bcast(self.sigma(t), xt).double()
        return (xt.double() - sigma * flow.double()).to(flow.dtype)

    def x0_to_flow(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._bcast(self.sigma(t), xt).double()
        return ((xt.double() - x0.double()) / sigma).to(x0.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching regression target."""
        return noise - x0
