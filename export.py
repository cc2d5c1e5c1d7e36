"""
A model the project can load -> a Hugging Face folder (config.json, model.safetensors and GPT-2's tokenizer files)
that transformers' GPT2LMHeadModel.from_pretrained and pipeline("text-generation") load.

  python export.py runs/gpt2-124m/best.pt out/my-gpt2   # a checkpoint of train_gpt2.py
  python export.py gpt2 gpt2-local                      # OpenAI's weights, kept for offline use
"""

import os

from gpt2lite.cli import ArgumentParser, InputError, run_cli
from train_gpt2 import load_model


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(description="Write a model as a Hugging Face folder (GPT2LMHeadModel).")
    parser.add_argument("model", help="a checkpoint of train_gpt2.py, a save_pretrained folder, or gpt2 ... gpt2-xl")
    parser.add_argument("out_dir", help="the folder to write (made if absent; the model's files in it are replaced)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if os.path.isfile(args.out_dir):
        raise InputError(f"{args.out_dir} is a file: give the folder to write the model into")
    load_model(args.model).save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}: GPT2LMHeadModel.from_pretrained({args.out_dir!r}) loads it, and so does "
          f"python sample.py --init-from {args.out_dir}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
