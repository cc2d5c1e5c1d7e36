"""
gpt2lite: the machinery around train_gpt2.py, the chapter people read. Each module is named for what it holds:

  cli          one-line errors for bad input, every problem at once, --help with each default, run_cli
  files        files written atomically; JSON and text read with a line that says what is wrong
  gpt2_files   OpenAI's tokenizer (tiktoken, or offline from hash-checked BPE files) and Hugging Face's weights
  shards       the token-shard format (llm.c's) and its manifest, read and checked
  text_data    text to shards: documents from files or the hub, tokenized on every core, written in order
  checkpoints  the run directory: checkpoints, log.jsonl, what to resume, the summary that ends a run
  lock         one run directory, one writer: flock on --run-dir, or a heartbeat lock where flock is not trusted
  run          a training run's inputs checked at once, the Run the loop works with, resuming, its first lines
  devices      the device, whether torch.compile works there, and what 100% MFU means on it
  evaluation   scoring completions: HellaSwag, LAMBADA, WikiText perplexity
  planning     what --plan measures and works out: time, memory, disk, passes; the largest micro batch that fits
  optimizers   Muon beside AdamW, stepped as one optimizer (one fp16 inf check, one checkpoint state)
  cpu_decode   a faster route for a KV-cached decode step's matrix products on a CPU

Nothing here imports train_gpt2 or any other script: `python train_gpt2.py` runs the chapter as __main__, so a
module that imported it back would make a second GPT class. Where the package needs the model or the loader, the
chapter passes them in.
"""
