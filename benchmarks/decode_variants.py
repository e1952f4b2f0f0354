"""The contestants of `decode_speed.py`, each a call that generates greedily and returns the first sequence's
new tokens: our engine (eager or compiled), transformers' generate() on the export, llama.cpp on the GGUF
export; and the machine's memory bandwidth, for the floor."""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run by an interpreter that has llama-cpp-python: one greedy generation per line of prompt ids on stdin
LLAMA_CHILD = """
import json, sys
import llama_cpp
path, threads, context, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
for line in sys.stdin:
    out = []
    llm.reset()  # no prompt reuse from the previous run: the prefill is timed, as for the others
    for token in llm.generate(json.loads(line), top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == new:
            break
    print(json.dumps(out), flush=True)
"""


def ours_variant(model, tokenizer, prompts, new_tokens: int, compile: bool):
    from blueberry.inference import Engine, SamplingParams

    engine = Engine(model, tokenizer, slots=len(prompts), compile=compile)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    return lambda: engine.generate(prompts, params)[0].output_ids


def hf_variant(model, prompts, new_tokens: int, dtype):
    import torch

    from blueberry.export.huggingface import to_hf_model

    hf_model = to_hf_model(model.float()).to(dtype).to(next(model.parameters()).device)
    ids = torch.tensor(prompts, device=next(hf_model.parameters()).device)

    def run():
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                                    eos_token_id=None)
        return out[0, ids.shape[1]:].tolist()
    return run


def has_llama_cpp(python: str | None) -> bool:
    """Whether `python` (else this interpreter) imports llama-cpp-python; if not, say so once: llama.cpp is skipped."""
    found = subprocess.run([python or sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not found:
        print(f"llama.cpp skipped: {python or sys.executable} has no llama-cpp-python (--llama-python)", flush=True)
    return found


def llama_cpp_variant(model, tokenizer, prompt: list[int], new_tokens: int, dtype_name: str,
                      python: str | None):
    """llama.cpp on the model's GGUF export (f32 or bf16), as many threads as torch uses here."""
    import torch

    from blueberry.export.gguf import export_gguf

    folder = Path(tempfile.mkdtemp(prefix="blueberry-gguf-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = export_gguf(model, tokenizer, folder / "model.gguf", {"fp32": "f32", "bf16": "bf16"}[dtype_name])
    child = subprocess.Popen([python or sys.executable, "-c", LLAMA_CHILD, str(path), str(torch.get_num_threads()),
                              str(model.config.max_seq_len), str(new_tokens)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    atexit.register(_end, child)
    line = json.dumps(prompt) + "\n"

    def run():
        child.stdin.write(line)
        child.stdin.flush()
        reply = child.stdout.readline()
        if not reply:
            raise RuntimeError("llama.cpp's process ended: is llama-cpp-python installed for "
                               f"{python or sys.executable}? (--llama-python)")
        return json.loads(reply)
    return run


def _end(child: subprocess.Popen) -> None:
    child.stdin.close()  # its loop over stdin ends
    try:
        child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def memory_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Bytes per second that summing a tensor far larger than the caches reads (the best of five)."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best
