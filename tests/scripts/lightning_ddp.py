"""A PyTorch Lightning DDP script, written as users write them for torchrun.

    torchrun --nproc_per_node 2 tests/scripts/lightning_ddp.py --output_dir OUT
    orchestrator launch cluster_configs/local.yaml -- tests/scripts/lightning_ddp.py --output_dir OUT

A small MLP on a fixed synthetic regression set (each epoch is 10 optimizer steps), checkpointed by
``ModelCheckpoint(save_last=True)`` every 10 steps into --output_dir and resumed from its
``last.ckpt``, as Lightning's docs show. With --report it adds the orchestrator's callback: the one
line a user adds for progress reports. Each step's loss (rank 0's) is printed as ``step N loss X``.
"""

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_rank == 0:
            print(f"step {self.global_step + 1} loss {loss.item()!r}", flush=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--report", action="store_true", help="add the orchestrator's progress callback")
    args = parser.parse_args()

    L.seed_everything(0, workers=True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10 * 8 * world, 32, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    callbacks = [ModelCheckpoint(dirpath=args.output_dir, save_last=True, every_n_train_steps=10, save_top_k=0)]
    if args.report:
        from orchestrator.integrations.lightning import OrchestratorCallback

        callbacks.append(OrchestratorCallback())
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)), strategy="ddp", max_steps=args.max_steps,
        callbacks=callbacks, deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.output_dir,
    )
    last = os.path.join(args.output_dir, "last.ckpt")
    trainer.fit(Regression(), loader, ckpt_path=last if os.path.exists(last) else None)


if __name__ == "__main__":
    main()
