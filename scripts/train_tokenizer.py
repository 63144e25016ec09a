"""Train the project's byte-level BPE tokenizer on the corpus from scripts/build_corpus.py and save it as an HF
tokenizer directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
`transformers.AutoTokenizer.from_pretrained(dir)` and `upcycle data prepare` both load offline.

    python scripts/train_tokenizer.py --corpus runs/corpus --out assets/tokenizer

Why 8192 ids: the demo's seed models have 5-20M parameters. With dim 256-384 an embedding plus an untied LM head cost
2 * V * dim parameters: 4.2-6.3M at V = 8192 but 16.8-25.2M at V = 32768, i.e. a 32k vocabulary would be most of the
model and leave little for the FFNs that upcycling is about. 8192 still merges the frequent English words, Python
keywords and common kana/kanji sequences; the price is more tokens per character (reported below on the validation
split). Byte-level: every UTF-8 string is encodable (no unknown token), which matters for a Japanese + code mix.

Training text: all train documents of the three domains, each followed by the EOS token "<|endoftext|>" (the one
special token; it separates packed documents in `upcycle data prepare`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

DOMAINS = ("english", "japanese", "code")
EOS = "<|endoftext|>"


def read_texts(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def train(files: list[Path], vocab_size: int):
    """A byte-level BPE over `files` (JSONL.gz with a "text" field); returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(text)) == text exactly, which the data round-trip tests rely on.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=True,
    )

    def texts():
        for path in files:
            yield from read_texts(path)

    tokenizer.train_from_iterator(texts(), trainer)
    return tokenizer


def save(tokenizer, out: Path) -> None:
    """Write the HF tokenizer files through transformers, so AutoTokenizer reads exactly what we wrote."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                           model_max_length=4096)
    hf_tokenizer.save_pretrained(str(out))
    special = out / "special_tokens_map.json"
    if not special.exists():  # transformers 5 folds this into tokenizer_config.json; older tools still look for it
        special.write_text(json.dumps({"bos_token": EOS, "eos_token": EOS}, indent=2) + "\n")


def chars_per_token(tokenizer, path: Path, max_documents: int = 2000) -> tuple[float, int, int]:
    texts = list(read_texts(path))[:max_documents]
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    chars = sum(len(t) for t in texts)
    return chars / tokens, chars, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="output directory of scripts/build_corpus.py")
    parser.add_argument("--out", type=Path, default=Path("assets/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)

    files = [args.corpus / f"{domain}.train.jsonl.gz" for domain in DOMAINS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"error: missing corpus files {missing}; run scripts/build_corpus.py first", file=sys.stderr)
        return 2
    start = time.time()
    tokenizer = train(files, args.vocab_size)
    print(f"trained vocab {tokenizer.get_vocab_size()} in {time.time() - start:.0f}s")
    save(tokenizer, args.out)

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(args.out))
    assert reloaded.eos_token == EOS and reloaded.eos_token_id == tokenizer.token_to_id(EOS)
    report = {}
    for domain in DOMAINS:
        ratio, chars, tokens = chars_per_token(tokenizer, args.corpus / f"{domain}.val.jsonl.gz")
        report[domain] = {"chars_per_token": round(ratio, 3), "characters": chars, "tokens": tokens}
        print(f"{domain}: {ratio:.2f} characters per token on the validation split ({chars:,} chars)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
