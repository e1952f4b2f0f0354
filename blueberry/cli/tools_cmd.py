"""`generate`, `eval` and `export`: what to do with a trained run."""

from __future__ import annotations

import sys

import torch

from ..errors import UsageError


def generate_command(args) -> int:
    from ..training.trained_run import load_trained

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    model, config, tok, ckpt = load_trained(args.checkpoint, args.device)
    device = next(model.parameters()).device
    ids = [tok.eot_id] + tok.encode(args.prompt)
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    new, shown = [], ""
    for token in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                eos=tok.eot_id, generator=gen):
        new.append(int(token))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0


def eval_command(args) -> int:
    from ..data import BatchLoader, create_dataset, load_and_cache_data, load_documents
    from ..data.corpus import encode_documents
    from ..training.evaluation import evaluate_model
    from ..training.trained_run import load_trained
    from ..training.precision import choose_precision

    model, config, tok, ckpt = load_trained(args.checkpoint, args.device)
    if args.dataset:
        docs = load_documents(args.dataset, args.text_field)
        tokens, _ = encode_documents(tok, docs, None)
        source = f"{args.dataset} ({len(docs)} documents, all evaluated)"
    else:
        _, _, corpus = load_and_cache_data(config, log=lambda *a: None)
        tokens, source = corpus.val, f"the validation split of {config.dataset}"
    dataset = create_dataset(tokens, "packed", config.max_seq_len)
    loader = BatchLoader(dataset, min(config.batch_size, len(dataset)), shuffle=False, max_batches=args.batches)
    precision = choose_precision(config, config.capabilities())
    result = evaluate_model(model, loader, config, token_bytes=tok.token_bytes(), precision=precision)
    print(f"Checkpoint {ckpt} on {source}: {result['tokens']:,} tokens")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte"):
        print(f"  {key:<14} {result[key]:.4f}")
    return 0


def export_command(args) -> int:
    from ..export import export_hf
    from ..training.trained_run import load_trained

    model, config, tok, ckpt = load_trained(args.run, "cpu")
    out = export_hf(model, tok, args.out)
    print(f"Exported {ckpt} as {type(model).__name__} -> Hugging Face format in {out}")
    return 0
