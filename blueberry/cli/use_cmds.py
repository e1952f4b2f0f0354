"""Verbs that use trained runs: `generate`, `chat`, `eval`, `compare`, `ensemble`, `export`, `import`, `push`,
`quantize`, `serve`."""

from __future__ import annotations

import functools
import sys

import torch

from ..errors import UsageError
from ..extras import require

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model_flags(p, what="run directory, checkpoint directory, or 'latest'") -> None:
    p.add_argument("--checkpoint", required=True, help=what)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the best one present)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights and activations at inference")
    p.add_argument("--debug", action="store_true")


def _sampling_flags(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: no cut-off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=0)


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="stream text from a run")
    _model_flags(g)
    g.add_argument("--prompt", default="")
    _sampling_flags(g, 200)
    g.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    g.add_argument("--compile", action="store_true", help="compile the decode step (worth it for long outputs)")
    g.add_argument("--draft", default=None, help="speculative decoding with this smaller run as the draft")
    g.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round")

    c = sub.add_parser("chat", help="talk to a run in the terminal (/reset starts over, Ctrl-D quits)")
    _model_flags(c)
    _sampling_flags(c, 256)
    c.add_argument("--system", default=None, help="a system message opening the conversation")

    e = sub.add_parser("eval", help="evaluate a run on its validation split or any dataset")
    _model_flags(e)
    e.add_argument("--dataset", default=None, help="evaluate on all documents of this dataset or file")
    e.add_argument("--text-field", default="text")
    e.add_argument("--batches", type=int, default=None, help="limit the number of batches")
    e.add_argument("--tasks", default=None, help="multiple-choice tasks: built-in names or .jsonl paths, "
                   "comma-separated ('auto': the built-in tasks of the run's dataset)")
    e.add_argument("--num-fewshot", type=int, default=0, help="examples from the task file put before each item")
    e.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    e.add_argument("--generation", type=int, default=0, metavar="N",
                   help="BLEU / ROUGE / exact match of greedy next lines for N held-out passages")
    e.add_argument("--bertscore-model", default=None, metavar="DIR",
                   help="with --generation: BERTScore P/R/F1 too, with this local transformers encoder directory "
                        "(bert-score package; no idf, no baseline rescaling)")
    e.add_argument("--bertscore-layers", type=int, default=None, metavar="L",
                   help="the encoder layer BERTScore compares (default: its last)")

    m = sub.add_parser("compare", help="runs side by side: one table and one plot of their curves")
    m.add_argument("runs", nargs="+", help="run directories")
    m.add_argument("--out", default="comparison.png", help="where to write the plot")
    m.add_argument("--debug", action="store_true")

    _ensemble_parser(sub)

    x = sub.add_parser("export", help="convert a run to another format")
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("out", help="output directory for hf (must not exist or be empty); the .gguf file to write "
                               "for gguf (a name without .gguf gets it)")
    x.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a transformers directory with a model card; gguf: one file for llama.cpp / Ollama")
    x.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="weight type of the GGUF matrices (norms and routers stay f32)")
    x.add_argument("--license", default="mit", help="license named in the model card (hf) and metadata (gguf)")
    x.add_argument("--debug", action="store_true")

    u = sub.add_parser("push", help="upload an export (or a run, exported first) to the Hugging Face Hub")
    u.add_argument("source", help="a directory written by export --format hf, or a run directory or checkpoint")
    u.add_argument("repo_id", help="the Hub repository, e.g. user/my-model (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    u.add_argument("--license", default="mit", help="license of the model card when a run is exported first")
    u.add_argument("--debug", action="store_true")

    i = sub.add_parser("import", help="turn a transformers checkpoint directory into a Blueberry run")
    i.add_argument("hf_dir", help="a directory saved with save_pretrained (Llama, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE)")
    i.add_argument("run", help="the run directory to write (must not exist or be empty)")
    i.add_argument("--seq-len", type=int, default=None, help="the window to use (default: the model's, at most 4096)")
    i.add_argument("--debug", action="store_true")

    q = sub.add_parser("quantize", help="write a weight-quantized copy of a run, with its quality cost")
    q.add_argument("run", help="run directory or checkpoint")
    q.add_argument("out", help="output run directory (must not exist or be empty)")
    q.add_argument("--method", choices=("int8", "int4"), default="int8")
    q.add_argument("--device", default=None)
    q.add_argument("--eval-batches", type=int, default=20, help="validation batches for the quality report")
    q.add_argument("--debug", action="store_true")

    _serve_parser(sub)


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API")
    _model_flags(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (continuous batching)")
    s.add_argument("--model-name", default=None, help="the model id clients ask for (default: the run's name)")
    s.add_argument("--compile", action="store_true",
                   help="compile the decode step, for 1, 2, 4, ... rows and all the slots, before serving")
    s.add_argument("--threads", type=int, default=None,
                   help="torch's intra-op threads (default on a CPU: one core fewer than it has, the other "
                        "left to the HTTP side, unless OMP_NUM_THREADS is set)")


def _ensemble_parser(sub) -> None:
    n = sub.add_parser("ensemble", help="combine finished runs of one tokenizer into one ensemble directory "
                       "(the mean of their distributions), scored on the first run's validation split")
    n.add_argument("runs", nargs="+", help="two or more finished run directories (not copied: DIR names them)")
    n.add_argument("--out", required=True, metavar="DIR", help="the ensemble directory to write (must not exist or "
                   "be empty); use it with eval, generate, chat, serve")
    n.add_argument("--device", default=None, help="where to score it (default: the first run's device)")
    n.add_argument("--debug", action="store_true")


def _params(args, stop=()):
    from ..inference import SamplingParams

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be 0 (no cut-off) or positive, got {args.top_k}")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                          top_p=args.top_p, seed=args.seed, stop=tuple(stop))


def _load(args):
    from ..runs.loading import load_model

    return load_model(args.checkpoint, args.device, DTYPES[args.dtype])


def generate_command(args) -> int:
    from ..inference import ContextLengthError, Engine

    params = _params(args, args.stop)
    model, config, tok, ckpt = _load(args)
    ids = [tok.prefix_id] + tok.encode(args.prompt)
    if args.draft:
        return _speculative(args, model, tok, ids, params)
    engine = Engine(model, tok, slots=1, compile=args.compile)
    sys.stdout.write(args.prompt)
    try:
        engine.submit(ids, params, on_text=lambda d: (sys.stdout.write(d), sys.stdout.flush()))
    except ContextLengthError as exc:
        raise UsageError(f"{exc} (--max-new-tokens)") from None
    engine.run_until_done()
    sys.stdout.write("\n")
    return 0


def _speculative(args, model, tok, ids, params) -> int:
    import time

    from ..inference import ContextLengthError
    from ..runs.loading import load_model
    from ..inference.speculative import check_same_tokenizer, speculative_generate

    draft, _, draft_tok, _ = load_model(args.draft, args.device, DTYPES[args.dtype])
    check_same_tokenizer(tok, draft_tok)
    start = time.perf_counter()
    try:
        result = speculative_generate(model, draft, ids, params, tok.eot_id, k=args.draft_tokens)
    except ContextLengthError as exc:
        raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - start
    text = tok.decode(result.output_ids)
    for stop in filter(None, params.stop):  # each cut keeps the text before the earliest stop
        text = text.split(stop, 1)[0]
    print(args.prompt + text)
    print(f"[speculative: {result.accepted}/{result.proposed} draft tokens accepted "
          f"({result.acceptance_rate:.0%}), {len(result.output_ids) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def chat_command(args) -> int:
    from ..inference.chat import chat_loop

    model, config, tok, ckpt = _load(args)
    return chat_loop(model, tok, _params(args), system=args.system)


def _packed_loader(tokens, config, batches):
    """Packed windows of a token stream in order: a one-shard store in memory, read by the one loader."""
    from ..data import ShardedLoader, create_dataset

    dataset = create_dataset(tokens, "packed", config.model.max_seq_len)
    return ShardedLoader([dataset], min(config.training.batch_size, len(dataset)), shuffle=False, max_batches=batches)


def _check_bertscore_flags(args) -> None:
    """Refuse --bertscore-model without --generation, or with a directory or layer that cannot work, before
    anything is generated."""
    if args.bertscore_model is None:
        if args.bertscore_layers is not None:
            raise UsageError("--bertscore-layers needs --bertscore-model DIR")
        return
    if not args.generation:
        raise UsageError("--bertscore-model scores generated continuations: give --generation N too")
    from ..evaluation.generation_metrics import bertscore_layer

    bertscore_layer(args.bertscore_model, args.bertscore_layers)


def eval_command(args) -> int:
    import json

    from ..data import load_documents
    from ..data.corpus import encode_documents
    from ..data.held_out import held_out_texts, validation_loader
    from ..evaluation.tasks import evaluate_tasks, markdown_table
    from ..runs.checkpoint import run_dir_of
    from ..training.evaluation import evaluate_model

    _check_bertscore_flags(args)
    model, config, tok, ckpt = _load(args)
    _check_eval_reports(run_dir_of(ckpt))  # before the work: a report eval did not write is refused up front
    if args.dataset:
        docs = load_documents(args.dataset, args.text_field)
        tokens, _ = encode_documents(tok, docs, None)
        source = f"{args.dataset} ({len(docs)} documents, all evaluated)"
        loader = _packed_loader(tokens, config, args.batches)
    else:  # the run's own validation split (documents, conversations or token stores), as training scored it
        docs, source = None, f"the validation split of {config.data.dataset}"
        loader = validation_loader(config, tok, args.batches)
    result = evaluate_model(model, loader, config, token_bytes=tok.token_bytes())
    print(f"Checkpoint {ckpt} on {source}: {result['tokens']:,} tokens")
    for key in ("loss", "perplexity", "accuracy", "bits_per_byte"):
        print(f"  {key:<14} {result[key]:.4f}")
    report = {"checkpoint": str(ckpt), "source": source, **{k: v for k, v in result.items() if k != "expert_load"}}
    lines = [f"# Evaluation of {ckpt}", "", f"{source}: loss {result['loss']:.4f}, perplexity "
             f"{result['perplexity']:.2f}, accuracy {result['accuracy']:.4f}, bits per byte {result['bits_per_byte']:.4f}"]
    if args.tasks:
        from ..evaluation.run_tasks import task_names

        names = task_names(config.replace(eval_tasks=args.tasks))
        report["tasks"] = evaluate_tasks(model, tok, names, num_fewshot=args.num_fewshot, limit=args.limit)
        table = markdown_table(report["tasks"])
        print(table)
        lines += ["", table]
    if args.generation:
        from ..evaluation.generation_metrics import continuation_pairs, generation_scores

        held_out = [d.text for d in docs] if docs else held_out_texts(config, tok)
        pairs = continuation_pairs(held_out, args.generation)
        if not pairs:  # conversations are short: a fine-tuning run's held-out texts may hold none
            raise UsageError(f"--generation: {source} holds no passage of 7 non-empty lines to continue; "
                             "give --dataset with longer held-out documents")
        report["generation"] = generation_scores(model, tok, pairs, bertscore_model=args.bertscore_model,
                                                 bertscore_layers=args.bertscore_layers)
        g = report["generation"]
        summary = (f"greedy next line of {g['pairs']} held-out passages: BLEU {g['bleu']:.2f}, ROUGE-1 "
                   f"{g['rouge1']:.4f}, ROUGE-2 {g['rouge2']:.4f}, ROUGE-L {g['rougeL']:.4f}, exact match "
                   f"{g['exact_match']:.4f}")
        if args.bertscore_model:
            report["generation"]["bertscore_model"] = str(args.bertscore_model)
            summary += (f", BERTScore P {g['bertscore_precision']:.4f} R {g['bertscore_recall']:.4f} F1 "
                        f"{g['bertscore_f1']:.4f} (layer {g['bertscore_layers']}, no baseline rescaling)")
        print(summary)
        lines += ["", summary]
    out = run_dir_of(ckpt)
    _write_eval_reports(out, json.dumps(report, indent=2) + "\n", "\n".join(lines) + "\n")
    print(f"Written: {out / 'eval.json'}, {out / 'eval.md'}")
    return 0


def _check_eval_reports(out) -> None:
    """Refuse (exit 2) an RUN/eval.json or RUN/eval.md that `eval` did not write (a JSON object naming its
    checkpoint; markdown opening "# Evaluation of")."""
    import json

    def ours(path, check) -> bool:
        try:
            return check(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return False

    def our_json(text) -> bool:
        report = json.loads(text)
        return isinstance(report, dict) and "checkpoint" in report
    checks = {"eval.json": our_json, "eval.md": lambda t: t.startswith("# Evaluation of")}
    for name, check in checks.items():
        if (out / name).exists() and not ours(out / name, check):
            raise UsageError(f"{out / name} was not written by blueberry eval; move it away (nothing was written)")


def _write_eval_reports(out, report_json: str, report_md: str) -> None:
    """RUN/eval.json and RUN/eval.md, each replaced atomically, and only over reports `eval` wrote:
    anything else there is refused (`_check_eval_reports`, again: something may have appeared meanwhile)."""
    from ..atomic import atomic_write_text

    _check_eval_reports(out)
    atomic_write_text(out / "eval.json", report_json)
    atomic_write_text(out / "eval.md", report_md)


def compare_command(args) -> int:
    from ..evaluation.compare import check_plot_target, comparison_table, load_run, plot_curves

    check_plot_target(args.out)
    runs = [load_run(r) for r in args.runs]
    print(comparison_table(runs))
    print(f"Curves: {plot_curves(runs, args.out)}")
    return 0


def ensemble_command(args) -> int:
    from ..training.combine_runs import combine_runs

    combine_runs(args.runs, args.out, args.device)
    return 0


def export_command(args) -> int:
    from ..export import export_hf
    from ..runs.loading import load_model, quantization_of
    from ..runs.checkpoint import resolve_checkpoint, run_dir_of

    if quantization_of(resolve_checkpoint(args.run)):
        raise UsageError(f"{args.run} is a quantized run; export the run it was made from")
    model, config, tok, ckpt = load_model(args.run, "cpu")
    if args.format == "gguf":
        from ..export.gguf import export_gguf, gguf_architecture

        path = args.out if str(args.out).endswith(".gguf") else f"{args.out}.gguf"
        out = export_gguf(model, tok, path, args.gguf_type, name=run_dir_of(ckpt).name, license=args.license)
        arch = gguf_architecture(config.model)
        print(f"Exported {ckpt} as llama.cpp architecture {arch} ({args.gguf_type}) -> {out}")
        return 0
    out = export_hf(model, tok, args.out, run_dir=run_dir_of(ckpt), license=args.license)
    print(f"Exported {ckpt} as {type(model).__name__} -> Hugging Face format in {out}")
    return 0


def push_command(args) -> int:
    """Upload an export, or export the run first (into a temporary directory, its card naming the repo)."""
    import tempfile
    from pathlib import Path

    from ..export import export_hf
    from ..export.push import check_repo_id, is_export, upload
    from ..runs.loading import load_model, quantization_of
    from ..runs.checkpoint import resolve_checkpoint, run_dir_of

    check_repo_id(args.repo_id)
    source = Path(args.source)
    if is_export(source):
        url = upload(source, args.repo_id, args.private, args.token)
    elif not source.exists() and args.source != "latest":
        raise UsageError(f"{args.source}: no such export or run directory")
    else:
        if quantization_of(resolve_checkpoint(args.source)):
            raise UsageError(f"{args.source} is a quantized run; push the run it was made from")
        model, _, tok, ckpt = load_model(args.source, "cpu")
        with tempfile.TemporaryDirectory(prefix="blueberry-push-") as tmp:
            folder = export_hf(model, tok, Path(tmp) / "export", run_dir=run_dir_of(ckpt), license=args.license,
                               repo=args.repo_id)
            url = upload(folder, args.repo_id, args.private, args.token)
    print(f"Pushed {args.source} -> {url}")
    return 0


def quantize_command(args) -> int:
    from ..inference.quantize_run import quantize_run

    report = quantize_run(args.run, args.out, args.method, args.device, args.eval_batches)
    print(f"Quantized {args.run} ({args.method}) -> {args.out}")
    for key, value in report.items():
        print(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value:,}")
    return 0


def serve_command(args) -> int:
    uvicorn = require("uvicorn", "serve", "blueberry serve")
    require("fastapi", "serve", "blueberry serve")
    from ..inference.engine import row_buckets
    from ..inference.engine_process import EngineProcess
    from ..inference.server import create_app
    from ..runs.checkpoint import resolve_run, run_dir_of

    if not 0 < args.port < 65536 or args.slots <= 0:
        raise UsageError("--port must be in 1..65535 and --slots positive")
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    ckpt = resolve_run(args.checkpoint)
    name = args.model_name or run_dir_of(ckpt).name
    if args.compile:
        rows = ", ".join(map(str, row_buckets(args.slots)))
        print(f"Compiling the decode step for {rows} rows before serving (once per start)", flush=True)
    engine = EngineProcess(functools.partial(served_model, str(ckpt), args.device, args.dtype), slots=args.slots,
                           compile=args.compile, threads=args.threads)
    if engine.compile_failure:
        print(f"--compile: no working compiler here, decoding eager ({engine.compile_failure})", flush=True)
    print(f"Serving {ckpt} as model {name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0


def served_model(checkpoint: str, device: str | None, dtype: str):
    """(model, tokenizer) of `blueberry serve`, loaded in its engine process."""
    from ..runs.loading import load_model

    model, _, tok, _ = load_model(checkpoint, device, DTYPES[dtype])
    return model, tok


def import_command(args) -> int:
    from ..training.init_from import import_hf_run

    out = import_hf_run(args.hf_dir, args.run, args.seq_len)
    print(f"Imported {args.hf_dir} -> {out} (continue with: python train.py --init-from {out} --dataset ...)")
    return 0


COMMANDS = {"generate": generate_command, "chat": chat_command, "eval": eval_command, "export": export_command,
            "quantize": quantize_command, "serve": serve_command, "compare": compare_command,
            "import": import_command, "push": push_command, "ensemble": ensemble_command}
