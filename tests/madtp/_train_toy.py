"""A toy regression run for the training-engine tests: imported by them, and run as a script (plain or torchrun).

The model has dropout and a tied (shared-storage) weight, and a controller callback with its own state changes a
non-parameter attribute of the model every step, the way a GFLOPs controller adjusts pruning temperatures.
"""
from __future__ import annotations

import argparse
import time

import torch
from madtp.train import Callback, TrainConfig, Trainer, seed_everything
from torch import nn


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 40, dim: int = 6):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, generator=g)
        self.y = torch.sin(self.x @ w) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class ToyMLP(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc3.weight = self.fc2.weight          # tied: one storage under two names
        self.head = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.temp = 1.0                            # set by the controller callback, not a parameter

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = self.drop(torch.tanh(self.fc2(h)))
        h = self.drop(torch.tanh(self.fc3(h)))
        return self.head(h).squeeze(-1) * self.temp


class RegressionTask:
    def loss(self, model, batch):
        err = model(batch["x"]) - batch["y"]
        return {"loss": (err ** 2).mean(), "mae": err.abs().mean()}

    def metric(self, model, loader):
        errs = [(model(b["x"]) - b["y"]) ** 2 for b in loader]
        return {"mse": torch.cat(errs).mean().item()}


class TempController(Callback):
    """Nudges model.temp towards a target MAE each step (stands in for the GFLOPs-target controller)."""

    def __init__(self, target: float = 0.3):
        self.target = target
        self.temperature = 1.0
        self.history = torch.zeros(0)

    def on_train_begin(self, trainer):
        trainer.model.temp = self.temperature

    def on_step_end(self, trainer, step, logs):
        self.temperature *= 1.0 + 0.05 * (1.0 if logs["mae"] > self.target else -1.0)
        self.history = torch.cat([self.history, torch.tensor([logs["loss"]])])
        trainer.model.temp = self.temperature

    def state_dict(self):
        return {"temperature": self.temperature, "history": self.history, "target": self.target}

    def load_state_dict(self, state):
        self.temperature = state["temperature"]
        self.history = state["history"].clone()
        self.target = state["target"]


class Sleep(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer, step, logs):
        time.sleep(self.seconds)


def build(config: TrainConfig, *, samples: int = 40, dropout: float = 0.0, sleep: float = 0.0,
          init_seed: int = 0, **kw) -> Trainer:
    seed_everything(init_seed)
    callbacks = [TempController()] + ([Sleep(sleep)] if sleep else [])
    return Trainer(ToyMLP(dropout=dropout), RegressionTask(), ToyDataset(samples), config, callbacks=callbacks, **kw)


def main(argv=None):
    p = argparse.ArgumentParser()
    TrainConfig.add_arguments(p)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    with build(TrainConfig.from_args(args), samples=args.samples, dropout=args.dropout, sleep=args.sleep) as t:
        t.fit()


if __name__ == "__main__":
    main()
