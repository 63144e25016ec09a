"""Every `upcycle` command as a plain typed function with a Google-style docstring: what cli.py turns into argparse
flags and --help (see there), and what runs it.

Nothing here imports torch or transformers at module level: each command imports the code it runs inside its body, so
`upcycle --help` and `upcycle COMMAND --help` load only this module and the torch-free declarations its signatures name
(convert_options; the config classes when a command lists its config's fields), and a broken optional extra only breaks
the command that needs it. The work itself lives in the modules imported below each docstring; a command only turns
its arguments into a call and its result into lines on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from upcycle.formats import hf_formats as hf
from upcycle.convert.options import ALIGNMENT_BYTES, DTYPE_BYTES, ConvertOptions, GrowOptions, aligned_expert
from upcycle.errors import UpcycleError


def _wrote(path: Path, quiet: bool) -> None:
    """What every command that writes a model says afterwards: the engine note (stderr), then where it wrote."""
    hf.print_engine_note(path)
    if not quiet:
        print(f"wrote {path}")


def convert_command(
    source: str,
    output: str,
    options: ConvertOptions = ConvertOptions(),
    force: bool = False,
    quiet: bool = False,
) -> None:
    """Convert a dense HF checkpoint (llama, mistral, qwen2, qwen3) into an HF MoE checkpoint.

    Args:
        source: Local dense checkpoint directory (config.json + safetensors).
        output: Directory to create (parents too); refused if it exists, unless --force.
        options: The conversion's choices: one flag per field of ConvertOptions.
        force: Replace an existing OUTPUT (only once the new one is complete).
        quiet: No progress bar.
    """
    from upcycle.convert.conversion import convert

    _wrote(convert(source, output, force=force, progress=not quiet, **asdict(options)), quiet)


def compose_command(spec: str, output: str, force: bool = False, quiet: bool = False) -> None:
    """Compose an MoE from several dense models (fine-tunes of one base), routers steered by example prompts.

    Args:
        spec: The YAML spec: base (or average: true), experts (source, positive, negative, ratio, index_mode),
            shared_expert, router, and upcycle convert options such as top_k, granularity, format (docs/convert.md).
        output: Directory to create (parents too); refused if it exists, unless --force.
        force: Replace an existing OUTPUT (only once the new one is complete).
        quiet: No progress bar.
    """
    from upcycle.convert.compose import compose

    path = compose(spec, output, force=force, progress=not quiet)
    manifest = json.loads((path / "upcycle_manifest.json").read_text())
    hf.print_engine_note(path)
    if not quiet:
        for record in manifest.get("prompt_routing", []):
            shares = " ".join(f"{s:.2f}" for s in record["top1_share"])
            print(f"layer {record['layer']}: share of each expert's prompt tokens routed to it (top-1): {shares}")
        print(f"wrote {path}")


def check_command(moe_dir: str, *, dense: str, text: str | None = None, max_tokens: int = 512,
                  tolerance: float = 1e-4, json_output: bool = False) -> int:
    """Compare an upcycled MoE with its parent: max |logit diff| and perplexity of both on a probe text.

    Exits with status 1 when the MoE should compute its parent's function (its upcycle_manifest.json says so: a naive
    conversion that renormalizes the top-k weights, a grow or compose at r = 0) and its logits differ from the parent's
    by more than --tolerance (without renormalization, --no-renormalize, naive is not exact by design and only the
    numbers are reported).

    Args:
        moe_dir: The MoE checkpoint directory (written by upcycle convert, compose or grow, any HF MoE, or a training
            checkpoint of ours, exported on the fly).
        dense: The parent checkpoint directory: the dense model (convert, compose) or the source MoE (grow); HF, or a
            training checkpoint of ours (exported on the fly). Both are validated as export validates its input.
        text: A UTF-8 text file to probe with (default: a built-in English/code/Japanese sample).
        max_tokens: Probe at most this many tokens.
        tolerance: Largest |logit diff| (float32) that counts as the same function.
        json_output: Print the report as one JSON object instead of text.
    """
    from upcycle.convert.check import check
    from upcycle.formats.model_card import add_check

    probe = None
    if text is not None:
        try:
            probe = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UpcycleError(f"cannot read --text {text}: {exc}") from None
    report = check(moe_dir, dense, text=probe, max_tokens=max_tokens, tolerance=tolerance)
    if add_check(Path(moe_dir), asdict(report), dense, tolerance):
        print(f"added the result to {Path(moe_dir) / 'README.md'}", file=sys.stderr)
    if json_output:
        print(json.dumps(asdict(report)))
    else:
        print(f"method:                {report.method or 'unknown (no manifest)'}")
        print(f"tokens probed:         {report.num_tokens}")
        print(f"max |logit diff|:      {report.max_abs_logit_diff:.3e}")
        print(f"mean |logit diff|:     {report.mean_abs_logit_diff:.3e}")
        print(f"top-1 agreement:       {report.top1_agreement:.4f}")
        print(f"perplexity dense/MoE:  {report.dense_perplexity:.4f} / {report.moe_perplexity:.4f}")
        if report.equivalent is not None:
            verdict = "EQUIVALENT" if report.equivalent else "NOT EQUIVALENT"
            print(f"function-preserving:   {verdict} (tolerance {tolerance:g})")
        elif report.method == "naive":
            print("naive conversion:      not exact by design (top-k weights not renormalized)")
        for record in report.prompt_routing or []:
            shares = " ".join(f"{s:.2f}" for s in record["top1_share"])
            print(f"prompts routed home:   layer {record['layer']}: {shares} (each expert's share of its own "
                  "prompt tokens at top-1)")
    return 1 if report.equivalent is False else 0


def grow_command(moe: str, output: str, options: GrowOptions = GrowOptions(), force: bool = False,
                 quiet: bool = False) -> None:
    """Grow an MoE's E experts into factor * E: each expert kept and joined by factor - 1 Drop-Upcycled copies.

    Args:
        moe: An HF MoE checkpoint (mixtral, qwen2_moe, qwen3_moe, granitemoeshared, glm4_moe) or one of our training
            checkpoints.
        output: Directory to create (parents too); refused if it exists, unless --force.
        options: The growth's choices: one flag per field of GrowOptions.
        force: Replace an existing OUTPUT (only once the new one is complete).
        quiet: No progress bar.
    """
    from upcycle.convert.grow import grow

    _wrote(grow(moe, output, force=force, progress=not quiet, **asdict(options)), quiet)


def train_command(
    *,
    config: str,
    out: str,
    max_steps: int | None = None,
    save_every: int | None = None,
    override: list[str] | None = None,
) -> None:
    """Train a dense or MoE model (from scratch, a checkpoint, or upcycled online); resumes if OUT has checkpoints.

    Any config field can also be overridden by its dotted name, e.g. `--optim.lr 1e-3 --train.seed 1`
    (values are read as YAML). Every section and field is documented in docs/training.md.

    Args:
        config: YAML config file of sections model, init, data, optim, schedule, train, checkpoint, logging
            (see configs/).
        out: Run directory: config.yaml, metrics.jsonl, checkpoints/. Re-running on it resumes from the newest
            checkpoint.
        max_steps: Shortcut for --train.max_steps.
        save_every: Shortcut for --checkpoint.every.
        override: Overrides as section.field=value, the same as --section.field value.
    """
    from upcycle.train.trainer import run_training
    from upcycle.train.config import load_config

    overrides = list(override or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if save_every is not None:
        overrides.append(f"checkpoint.every={save_every}")
    run_training(load_config(config, overrides), out)


def plan_command(
    *,
    config: str,
    ranks: int | None = None,
    ranks_per_node: int | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    device_memory: str | None = None,
    host_memory: str | None = None,
    override: list[str] | None = None,
) -> None:
    """Print the memory a training config needs per rank and per node, without building any weight.

    Builds the config's model on the meta device and places every parameter as `upcycle train` would for the given
    ranks, expert-parallel degree (train.expert_parallel) and precision, then prints the parameters (total, active)
    and per rank the weights, gradients, AdamW state, FSDP's gathered blocks, an activation estimate at the configured
    micro-batch, and the host memory at build and at save. Refuses (exit 2) a plan that does not fit the given memory.
    Any config field can be overridden as in `upcycle train` (e.g. --train.expert_parallel 8).

    Args:
        config: The training config (YAML) to plan.
        ranks: Number of ranks (processes); default: WORLD_SIZE when launched by torchrun, else 1.
        ranks_per_node: Ranks sharing one machine's host memory; default: all of them, at most 8.
        device: What the ranks compute on: cuda, cpu, or auto (this machine's).
        device_memory: Memory of one accelerator, e.g. 80GB (cuda; default: this machine's GPU if it has one).
        host_memory: Memory of one node, e.g. 2TB; default: this machine's.
        override: Overrides as section.field=value, the same as --section.field value.
    """
    from upcycle.train.config import load_config
    from upcycle.train.plan import print_plan

    train_config = load_config(config, list(override or []))
    world_size = ranks if ranks is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 1:
        raise UpcycleError(f"--ranks must be >= 1, got {world_size}")
    per_node = ranks_per_node if ranks_per_node is not None else min(world_size, 8)
    if not 1 <= per_node <= world_size:
        raise UpcycleError(f"--ranks-per-node must lie in [1, --ranks={world_size}], got {per_node}")
    print_plan(train_config, world_size, per_node, device, device_memory, host_memory)


def export_command(
    checkpoint: str,
    out: str,
    format: Literal["auto", "mixtral", "qwen2_moe", "qwen3_moe", "granitemoeshared", "granitemoe", "glm4_moe", "llama",
                    "qwen2", "qwen3"] = "auto",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    tokenizer: str | None = None,
    force: bool = False,
    max_shard_size: str = "5GB",
) -> None:
    """Export a checkpoint (ours or HF) as a Hugging Face checkpoint that transformers loads, streaming one tensor at a
    time (memory for about the two largest tensors, whatever the model's size).

    Args:
        checkpoint: Directory of our training checkpoint (model.safetensors + config.json with "model") or of an HF
            checkpoint.
        out: Output directory to create, written atomically; refused if it exists, unless --force.
        format: auto (dense -> llama/qwen2/qwen3 by attention features; MoE -> mixtral for Llama-like attention
            (qwen2_moe with dense layers or a gated shared expert; granitemoeshared with an ungated shared expert or
            Granite's multipliers), qwen2_moe with q/k/v biases, qwen3_moe with q/k norms; glm4_moe, the only format
            that holds them, for sigmoid routers and their balancing bias), or one of mixtral, qwen2_moe, qwen3_moe,
            granitemoeshared, granitemoe (Granite's MoE without the shared expert), glm4_moe, llama, qwen2, qwen3.
        dtype: Weight dtype in the output: float32 (exact), bfloat16 or float16.
        tokenizer: A directory whose tokenizer files (tokenizer.json, tokenizer_config.json, ...) are copied into OUT.
        force: Replace an existing OUT (only once the new one is complete).
        max_shard_size: Largest output safetensors file, e.g. 5GB or 500MB (several files get an index).
    """
    from upcycle.files import check_output
    from upcycle.formats.safetensors_io import parse_shard_size
    from upcycle.model.hf import check_model_dir, export_card, export_hf, model_tensors

    parse_shard_size(max_shard_size)
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise UpcycleError(f"--tokenizer {tokenizer} has no tokenizer.json")
    inputs = (checkpoint, *([tokenizer] if tokenizer is not None else ()))
    check_output(out, force=force, inputs=inputs, flag="OUT")
    check_model_dir(checkpoint)
    config, tensors = model_tensors(checkpoint)  # read one tensor at a time while writing
    if config.is_moe and format not in hf.DENSE_FAMILIES:
        if not aligned_expert(config.expert_dim, dtype):  # as convert refuses such a granularity (docs/convert.md)
            other = [d for d in DTYPE_BYTES if aligned_expert(config.expert_dim, d)]
            raise UpcycleError(f"the experts of {checkpoint} have {config.expert_dim} neurons, whose rows of "
                               f"{config.expert_dim * DTYPE_BYTES[dtype]} bytes in {dtype} are not a multiple of "
                               f"{ALIGNMENT_BYTES} bytes, which transformers' grouped matmul needs to run them; "
                               + (f"export with --dtype {other[0]}" if other else "transformers cannot run them"))
    path = export_hf(tensors, config, out, fmt=format, dtype=dtype, tokenizer=tokenizer, force=force, inputs=inputs,
                     max_shard_size=max_shard_size)
    export_card(path, checkpoint)
    _wrote(path, quiet=False)


def prepare_command(
    out: str,
    tokenizer: str,
    *,
    domain: list[str] | None = None,
    val_domain: list[str] | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    dtype: Literal["auto", "uint16", "uint32"] = "auto",
    text_field: str = "text",
    eos_token: str | None = None,
    force: bool = False,
) -> None:
    """Tokenize text into flat per-domain token files for `upcycle train`.

    Example: upcycle data prepare runs/data assets/tokenizer --domain english=en.jsonl.gz,docs/ code=src/

    Args:
        out: Output directory (data.json plus NAME.train.bin / NAME.val.bin); must not exist unless --force.
        tokenizer: Local directory with tokenizer.json (an HF model or tokenizer dir), or the tokenizer.json file.
        domain: One or more NAME=PATH[,PATH...]. A path is a file or a directory (every non-hidden file below it;
            only the parquet files of a directory that holds some, as a Hub dataset does). `.jsonl` files hold one
            document per line in the field --text-field, `.parquet` files one per row of the column --text-field
            (needs the parquet extra); any other file is one document; `.gz` is read transparently.
        val_domain: Optional explicit validation inputs, NAME=PATH[,PATH...] as for --domain (e.g. the
            NAME.val.jsonl.gz files of scripts/build_corpus.py); those domains ignore --val-fraction.
        val_fraction: Fraction of each domain's documents held out for validation (whole documents, at least one).
        seed: Seed of the validation split; the same inputs and seed give the same split.
        dtype: Token file dtype: auto (uint16 when the vocabulary fits, else uint32), uint16 or uint32.
        text_field: JSONL field or parquet column that holds the text.
        eos_token: EOS token text, if the tokenizer files do not name one.
        force: Replace an existing output directory.
    """
    from upcycle.data.prepare import parse_domain_args, prepare

    domains = parse_domain_args(domain, "--domain")
    if not domains:
        raise UpcycleError("no domains given; pass e.g. --domain english=corpus/en code=corpus/code")
    metadata = prepare(domains, out, tokenizer, val_fraction=val_fraction, seed=seed, dtype=dtype,
                       text_field=text_field, eos_token=eos_token, force=force,
                       val_sources=parse_domain_args(val_domain, "--val-domain"))
    for name, info in metadata["domains"].items():
        print(f"{name}: train {info['train']['tokens']:,} tokens / {info['train']['documents']:,} docs, "
              f"val {info['val']['tokens']:,} tokens / {info['val']['documents']:,} docs")
    print(f"wrote {out} ({metadata['dtype']}, vocab {metadata['vocab_size']}, eos id {metadata['eos_id']})")


def eval_command(
    model: str,
    *,
    data: str,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_sequences: int = 64,
    domains: list[str] | None = None,
    json_output: bool = False,
    lm_eval_tasks: list[str] | None = None,
    lm_eval_include: str | None = None,
    limit: int | None = None,
    tokenizer: str | None = None,
) -> None:
    """Per-domain validation loss and perplexity of a checkpoint (dense or MoE, ours or Hugging Face).

    Args:
        model: Checkpoint directory: our training checkpoint, or an HF dense/MoE checkpoint.
        data: Prepared data directory (with data.json, from `upcycle data prepare`); its validation split is scored.
        seq_len: Tokens per scored sequence (default: 256, or the model's max_seq_len when shorter; at most the
            model's max_seq_len).
        batch_size: Sequences per forward pass.
        max_sequences: Validation sequences per domain, spread evenly over its validation tokens.
        domains: Only these domains (default: all in data.json).
        json_output: Print the results as JSON instead of a table.
        lm_eval_tasks: Also run these lm-evaluation-harness tasks (needs the `eval` extra), e.g. upcycle_continuations.
        lm_eval_include: A directory of extra lm-eval task YAMLs.
        limit: lm-eval: score only the first N documents of each task.
        tokenizer: lm-eval: tokenizer directory (default: the model directory, else the one data.json names).
    """
    from upcycle.eval.evaluate import evaluate, format_table, run_lm_eval

    result = evaluate(model, data, seq_len=seq_len, batch_size=batch_size, max_sequences=max_sequences,
                      domains=domains)
    if lm_eval_tasks:
        result["lm_eval"] = run_lm_eval(model, lm_eval_tasks, lm_eval_include, limit, tokenizer=tokenizer,
                                        data_dir=data, batch_size=batch_size)
    if json_output:
        print(json.dumps(result, indent=2))
        return
    print(format_table(result))
    for task, metrics in result.get("lm_eval", {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"lm-eval {task}: {shown}")


def analyze_command(
    model: str,
    *,
    data: str,
    out: str,
    layers: list[int] | None = None,
    dense: str | None = None,
    upcycled_from: str | None = None,
    seq_len: int = 256,
    max_sequences: int = 32,
    batch_size: int = 8,
    domains: list[str] | None = None,
    force: bool = False,
) -> None:
    """Routing per domain, expert drift from the dense parent and expert similarity of an MoE checkpoint.

    Args:
        model: MoE checkpoint directory: our training checkpoint or an HF MoE (e.g. the output of upcycle convert).
        data: Prepared data directory (data.json); each domain's validation sequences are routed.
        out: Output directory for analysis.json, routing.png, layers.png and expert_similarity.png; refused if it
            exists and is not empty, unless --force.
        layers: MoE layers drawn in the routing and similarity figures (default: first, middle, last); statistics
            cover every layer.
        dense: Dense parent for expert drift (default: the source recorded in the convert manifest, if any).
        upcycled_from: Output directory of upcycle convert the model descends from (for a training checkpoint): gives
            the re-drawn neuron masks and the dense parent.
        seq_len: Tokens per routed sequence.
        max_sequences: Validation sequences per domain.
        batch_size: Sequences per forward pass.
        domains: Only these domains (default: all in data.json).
        force: Replace an existing output directory (only once the new analysis is complete).
    """
    from upcycle.eval.analyze import analyze

    analysis = analyze(model, data, out, layers=layers, seq_len=seq_len, max_sequences=max_sequences,
                       batch_size=batch_size, domains=domains, manifest_dir=upcycled_from, dense_path=dense,
                       force=force)
    print(f"{'layer':>5}{'JSD':>8}{'tok.H':>8}{'imbal.':>8}  dead experts (all domains)")
    for entry in analysis["layers"]:
        jsd = entry["specialization_jsd"]
        pooled = entry["all_domains"]
        print(f"{entry['layer']:>5}{jsd if jsd is not None else float('nan'):>8.3f}{pooled['token_entropy']:>8.3f}"
              f"{pooled['load_imbalance']:>8.2f}  {pooled['dead_experts'] or '-'}")
    print(f"wrote {Path(out) / 'analysis.json'} and {', '.join(Path(p).name for p in analysis.get('figures', []))}")


def experiment_command(
    *,
    out: str,
    config: str | None = None,
    parallel: int = 1,
    only: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
    rescore: bool = False,
    data: str | None = None,
    recompute: bool = False,
    merge: list[str] | None = None,
) -> None:
    """Train a set of arms (dense, fs, naive, noise, drop, btx, grow, continue) at several seeds and budgets with one
    recipe and compare them; resumable. Or, with --rescore, re-measure a finished experiment's kept models on other
    data; with --recompute, rebuild a report from its results alone; with --merge, make one experiment's report from
    pieces of it run elsewhere.

    Writes OUT/results.json, OUT/documents.json (per-document losses), OUT/report.md and PNG figures (loss per domain
    and its means, gaps to naive with intervals, specialization and expert similarity, routing per arm). Re-running
    the same command after a kill finishes the unfinished runs from their last checkpoints and skips finished ones.
    See docs/experiments.md.

    Args:
        out: Experiment directory; re-running on it resumes. A different config on an existing OUT is refused.
        config: Experiment YAML (see experiments/ and the fields below); not with --rescore, --recompute or --merge.
        parallel: Runs (arm, seed) trained at once, each in its own process with threads / parallel torch threads.
        only: Run only these arms (no results.json or report; a run without --only and --seeds writes them).
        seeds: Run only these of the config's seeds (no report).
        threads: Torch threads in all (default: torch's default, one per core).
        rescore: Re-measure every kept model of the finished experiment in OUT on --data's validation split (no
            training); writes OUT/rescore/NAME/ (NAME: the data directory's name).
        data: With --rescore: a prepared data directory (upcycle data prepare) tokenized with the seed's tokenizer.
        recompute: Rebuild OUT's results.json aggregates, report.md and figures from its results.json and
            documents.json alone (OUT: an experiment's directory, a rescore of it, or a merge); no training.
        merge: Directories of pieces of one experiment (each the OUT of a run with --only/--seeds, e.g.
            scripts/gpu_piece.sh's), holding every run once between them: their runs gathered into OUT, which gets
            the experiment's full report.
    """
    from upcycle.experiment.runner import merge_pieces, rescore_experiment, run_experiment
    from upcycle.experiment.config import load_experiment
    from upcycle.experiment.report import REPORT_FILE, RESULTS_FILE, recompute as recompute_report

    modes = [flag for flag, given in (("--rescore", rescore), ("--recompute", recompute), ("--merge", merge))
             if given]
    if len(modes) > 1:
        raise UpcycleError(f"{modes[0]} and {modes[1]} are different jobs; give one of them")
    if modes and (config is not None or only or seeds or parallel != 1):
        job = {"--rescore": "re-measures the experiment recorded in OUT", "--recompute": "rebuilds what OUT recorded",
               "--merge": "gathers what the pieces recorded"}[modes[0]]
        raise UpcycleError(f"{modes[0]} {job}: leave out --config, --only, --seeds and --parallel")
    if data is not None and not rescore:
        raise UpcycleError("--data is only used with --rescore; the experiment's data comes from its config")
    if rescore:
        if data is None:
            raise UpcycleError("--rescore needs --data DIR, a prepared data directory to score the kept models on")
        rescore_experiment(out, data, threads=threads)
        return
    if recompute:
        recompute_report(out)
        return
    if merge:
        merge_pieces(merge, out)
        return
    if config is None:
        raise UpcycleError("give --config FILE (an experiment YAML), or --rescore --data DIR, --recompute or --merge "
                           "DIR ... for work on existing results")
    experiment = load_experiment(config)
    results = run_experiment(experiment, out, config_path=str(Path(config).resolve()), parallel=parallel, only=only,
                             seeds=seeds, threads=threads)
    if results is not None:
        reference = results["reference"]
        width = max(20, *(len(arm["name"]) + 2 for arm in results["arms"]))
        print(f"{'arm':<{width}}{'budget':>14}{'mean loss':>12}  gap to {reference or 'naive'} [95% interval] (call)")
        for arm in results["arms"]:
            for budget in arm["budgets"]:
                gap = budget.get("gap", {}).get("mean")
                gap_text = "-" if gap is None or arm["name"] == reference else (
                    f"{gap['mean']:+.4f}" + (f" [{gap['low']:+.4f}, {gap['high']:+.4f}]" if gap["low"] is not None
                                             else "") + f" ({gap['role']}: {gap['verdict']}"
                    + (", provisional" if gap["provisional"] else "") + ")")
                print(f"{arm['name']:<{width}}{budget['tokens']:>14,}{budget['loss']['mean']['mean']:>12.4f}  "
                      f"{gap_text}")
        print(f"upcycle experiment: wrote {Path(out) / RESULTS_FILE}, {Path(out) / REPORT_FILE} and the figures",
              file=sys.stderr, flush=True)


def _train_config_fields() -> str:
    from upcycle.train.config import config_fields_help

    return config_fields_help()


def _experiment_config_fields() -> str:
    from upcycle.experiment.config import config_help

    return config_help()


# What a command lists besides its signature in its --help (cli.py calls it only for that command's help).
train_command.help_epilog = _train_config_fields
plan_command.help_epilog = _train_config_fields
experiment_command.help_epilog = _experiment_config_fields

def bench_command(model: str, *, dense: str | None = None, prompt_lengths: list[int] | None = None,
                  batch_sizes: list[int] | None = None, decode_tokens: int = 32, repeats: int = 5, warmup: int = 1,
                  device: Literal["auto", "cpu", "cuda"] = "auto",
                  dtype: Literal["float32", "bfloat16", "float16"] = "float32", output: str | None = None,
                  quick: bool = False) -> None:
    """Measure what a model costs to serve in transformers (prefill and decode tokens/s, memory), against its dense
    parent with --dense: the inference price of an upcycled MoE, on the device at hand.

    Both models are loaded in one process and measured interleaved in a shuffled order over --repeats rounds after
    --warmup rounds; medians and their MoE / dense ratios are printed as a table (and written as JSON with --output).
    On a CPU, peak memory is each model's own child process's peak resident memory; on CUDA, the allocator's peak.
    What the numbers do and do not predict for llama.cpp or vLLM: docs/eval.md.

    Args:
        model: The model directory (an HF checkpoint written by upcycle convert/compose/grow/export, any HF causal LM
            transformers loads without remote code, or a training checkpoint of ours).
        dense: The dense parent to compare with (prints the ratios).
        prompt_lengths: Prompt lengths for prefill (default 128 512).
        batch_sizes: Batch sizes for decode (default 1 8).
        decode_tokens: Tokens generated per sequence in each decode measurement.
        repeats: Timed rounds; the medians are reported.
        warmup: Untimed rounds first.
        device: auto (CUDA if available), cpu or cuda.
        dtype: The weights' and activations' dtype.
        output: Also write the results as JSON to this file.
        quick: A smoke run: one prompt of 32 tokens, batch 1, 4 decode tokens, 2 repeats.
    """
    import torch

    from upcycle.eval.bench import QUICK, run_bench

    settings = dict(QUICK) if quick else dict(prompt_lengths=prompt_lengths or [128, 512],
                                               batch_sizes=batch_sizes or [1, 8], decode_tokens=decode_tokens,
                                               repeats=repeats, warmup=warmup)
    for name in ("decode_tokens", "repeats"):
        if settings[name] < 1:
            raise UpcycleError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["warmup"] < 0:
        raise UpcycleError(f"--warmup must be >= 0, got {settings['warmup']}")
    for flag in ("prompt_lengths", "batch_sizes"):
        if any(v < 1 for v in settings[flag]):
            raise UpcycleError(f"--{flag.replace('_', '-')} must all be >= 1, got {settings[flag]}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UpcycleError("--device cuda: no CUDA device here; use --device cpu")
    run_bench(model, dense=dense, settings=settings, device=device, dtype=dtype, output=output)
