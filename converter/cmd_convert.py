"""``qconv convert SOURCE``: a thin Click wrapper over :func:`qconv.converter.conversion.convert` (and the push)."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.errors import QconvError

SUFFIX = "-bnb-4bit"


def default_out(source: str) -> Path:
    """``./<source name>-bnb-4bit``: the directory name, the repo name, or the GGUF file stem."""
    text = str(source).rstrip("/\\")
    path = Path(text)
    name = path.stem if path.suffix.lower() == ".gguf" else (path.resolve().name if path.exists() else text.rsplit("/", 1)[-1])
    return Path.cwd() / f"{name or 'model'}{SUFFIX}"


@click.command("convert")
@click.argument("source")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: ./<source name>-bnb-4bit).")
@click.option("--nf4", "quant_type", flag_value="nf4", default=True, help="NormalFloat4 (default).")
@click.option("--fp4", "quant_type", flag_value="fp4", help="FP4 instead of NF4.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the absmax scales too (saves ~0.37 bits/param).")
@click.option("--blocksize", type=int, default=64, show_default=True, help="Weights per absmax block.")
@click.option("--compute-dtype", default="bfloat16", show_default=True,
              help="dtype for compute and for every tensor kept unquantized: bfloat16, float16 or float32.")
@click.option("--quant-storage", default="uint8", show_default=True,
              help="Storage dtype of the packed weights (bfloat16/float16/float32 for FSDP).")
@click.option("--skip-modules", default="", help="Comma-separated module names to keep unquantized "
              "(replaces transformers' default list, like llm_int8_skip_modules).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (bounds memory).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (safely: swapped in at the end).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda: where to quantize.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of SOURCE.")
@click.option("--token", default=None, help="Hugging Face token (else HF_TOKEN or the stored login).")
@click.option("--fix-tokenizer/--no-fix-tokenizer", default=True, show_default=True,
              help="Repair pad token and related tokenizer/config problems (always recorded in the manifest).")
@click.option("--fix-untrained-tokens", is_flag=True, help="Set untrained embedding rows to the mean of trained rows.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.option("--push", is_flag=True, help="Upload the result to the Hugging Face Hub after converting.")
@click.option("--repo-id", default=None, help="With --push: target repo (default <namespace or user>/<name>-bnb-4bit).")
@click.option("--namespace", default=None, help="With --push: user or organisation for the default repo id.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--dry-run", is_flag=True, help="With --push: show what would be uploaded, upload nothing.")
def command(source: str, out: Path | None, quant_type: str, double_quant: bool, blocksize: int, compute_dtype: str,
            quant_storage: str, skip_modules: str, max_shard_size: str, overwrite: bool, device: str,
            revision: str | None, token: str | None, fix_tokenizer: bool, fix_untrained_tokens: bool,
            progress: bool, push: bool, repo_id: str | None, namespace: str | None, private: bool,
            dry_run: bool) -> None:
    """Quantize SOURCE (a checkpoint directory, a Hub repo id, or a .gguf file) to a bnb 4-bit checkpoint.

    The output loads with plain transformers + bitsandbytes (AutoModelForCausalLM.from_pretrained) and
    with qconv's fast loader.
    """
    from qconv.converter.conversion import convert
    from qconv.format import QuantSettings

    for flag, value in (("--repo-id", repo_id), ("--namespace", namespace), ("--private", private),
                        ("--dry-run", dry_run)):
        if value and not push:
            raise QconvError(f"{flag} only applies with --push")
    settings = QuantSettings(
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        quant_storage=quant_storage,
        skip_modules=tuple(m.strip() for m in skip_modules.split(",") if m.strip()),
    )
    if push:  # decide the target first: a missing token fails before a long conversion, and the card names it
        from qconv.converter.push import target_repo_id

        repo_id = target_repo_id(source, repo_id=repo_id, namespace=namespace, token=token)
    result = convert(
        source, out or default_out(source), settings, revision=revision, token=token, device=device,
        max_shard_size=max_shard_size, overwrite=overwrite, fix_tokenizer=fix_tokenizer,
        fix_untrained_tokens=fix_untrained_tokens, progress=progress, repo_id=repo_id,
    )
    click.echo(f"{result.out_dir}: {result.summary}")
    if push:
        from qconv.converter.push import push_output

        pushed = push_output(result.out_dir, repo_id=repo_id, namespace=namespace, private=private, token=token,
                             overwrite=overwrite, dry_run=dry_run)
        click.echo(f"{'would push' if dry_run else 'pushed'} to {pushed}")
