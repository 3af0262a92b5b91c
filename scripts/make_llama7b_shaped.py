"""Write a LLaMA-2-7B-shaped checkpoint with random weights (bf16, sharded safetensors) for benchmarks.

The default shape is LLaMA-2-7B's (hidden 4096, 32 blocks, MLP 11008, 32 heads, vocab 32000;
13.5 GB). Flags make it smaller (tests write a few-MB one). Tensors are generated and written one
at a time (seeded per tensor), so the script needs memory for one tensor, not the model. Linear
and embedding weights are N(0, 0.02^2) like a fresh initialisation; norms are 1 + N(0, 0.1^2).
A small BPE tokenizer trained on the built-in pydoc text is added, so the folder works with
`llmrom compress FOLDER --stream ...` as it is.

    python scripts/make_llama7b_shaped.py /tmp/llama7b-random
    python scripts/make_llama7b_shaped.py /tmp/tiny --hidden 64 --layers 3 --intermediate 160 --heads 4 --vocab 256
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from tqdm.auto import tqdm

from llmrom.modeling.shards import shard_name, write_index, write_shard


def random_tensor(name, shape, index, seed, std):
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if "norm" in name:
        return (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (std * torch.randn(shape, generator=g)).to(torch.bfloat16)


def make(out, hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=None, vocab=32000, shard_mb=2000,
         seed=0, tokenizer=True, progress=True):
    out = Path(out)
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                                      vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, dtype="bfloat16",
                                      bos_token_id=1 if vocab > 1 else None, eos_token_id=2 if vocab > 2 else None)
    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    names = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    limit, shards, cur, size = shard_mb * 2**20, [], [], 0
    for i, (k, shape) in enumerate(names):
        nbytes = torch.Size(shape).numel() * 2
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((i, k, shape))
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    std = config.initializer_range
    for s, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress), 1):
        fname = shard_name(s, len(shards))
        entries = [(k, torch.bfloat16, shape, lambda k=k, shape=shape, i=i: random_tensor(k, shape, i, seed, std))
                   for i, k, shape in shard]
        total += write_shard(tmp / fname, entries)
        weight_map.update({k: fname for _, k, _ in shard})
    write_index(tmp, weight_map, total)
    config.save_pretrained(tmp)
    if tokenizer:
        _tokenizer(min(vocab, 1000)).save_pretrained(tmp)
    (tmp / "README.txt").write_text("Random weights in the shape of LLaMA-2-7B, written by llmrom's "
                                    "scripts/make_llama7b_shaped.py for benchmarks. Not a language model.\n"
                                    + json.dumps({"hidden": hidden, "layers": layers, "intermediate": intermediate,
                                                  "heads": heads, "vocab": vocab, "seed": seed}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _tokenizer(vocab):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=max(vocab, 300), special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write (replaced if it exists)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, help="default: --heads (no GQA, as LLaMA-2-7B)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=2000, help="largest shard in MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true")
    a = ap.parse_args(argv)
    if a.vocab < 300 and not a.no_tokenizer:
        ap.error("the BPE tokenizer needs --vocab 300 or more (or pass --no-tokenizer)")
    out = make(a.out, a.hidden, a.layers, a.intermediate, a.heads, a.kv_heads, a.vocab, a.shard_mb, a.seed,
               not a.no_tokenizer)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {size / 1e9:.2f} GB of bf16 safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
