"""A Hugging Face Trainer + DeepSpeed ZeRO-2 script, written as users write them for torchrun.

    torchrun --nproc_per_node 2 tests/scripts/hf_clm.py --output_dir OUT --deepspeed tests/scripts/ds_zero2.json
    orchestrator launch cluster_configs/local.yaml -- tests/scripts/hf_clm.py --output_dir OUT --deepspeed ...

A tiny GPT-2 built from a config (no downloads), trained on bytes of a local text file; it resumes
from its own last checkpoint in --output_dir, as Hugging Face's example scripts do. With
--report it adds the orchestrator's callback: the one line a user adds for progress reports.
"""

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of a file's bytes, as token ids (a 256-token vocabulary)."""

    def __init__(self, path: str, block: int, count: int) -> None:
        data = open(path, "rb").read()[: block * count]
        self.ids = torch.tensor(list(data), dtype=torch.long).view(-1, block)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--deepspeed", required=True, help="DeepSpeed config JSON")
    parser.add_argument("--train_file", default=argparse.__file__)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--save_steps", type=int, default=10)
    parser.add_argument("--report", action="store_true", help="add the orchestrator's progress callback")
    args = parser.parse_args()

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.output_dir, deepspeed=args.deepspeed, use_cpu=True, max_steps=args.max_steps,
        per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=0, logging_steps=1,
        save_steps=args.save_steps, seed=0, data_seed=0, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, include_num_input_tokens_seen="all",
    )
    trainer = Trainer(model=model, args=training, train_dataset=ByteBlocks(args.train_file, 64, 512))
    if args.report:
        from orchestrator.api import OrchestratorCallback

        trainer.add_callback(OrchestratorCallback())
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)


if __name__ == "__main__":
    main()
