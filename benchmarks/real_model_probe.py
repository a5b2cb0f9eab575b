"""Full-precision perplexity of a model on a data stage output's validation text, and its step costs.

Usage: python benchmarks/real_model_probe.py DATA_DIR MODEL_DIR   (THREADS=1 for one-thread CPU seconds)

Prints JSON: the load time, perplexity under protocol nonoverlap-L256-N12, and for a forward of 4×256 and
16×128 tokens and a forward+backward of 4×256 tokens the best wall and CPU seconds of a few repetitions.
Random token ids are fine for timing: the cost does not depend on which tokens they are.
"""
import json
import os
import sys
import time

import torch

from coalora.artifacts import read_jsonl
from coalora.evaluate import perplexity
from coalora.model.load import load_model


def timed(fn, reps=3):
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_min": round(min(wall), 2), "wall_median": round(sorted(wall)[len(wall) // 2], 2),
            "cpu_min": round(min(cpu), 2)}


def main(data_dir, model_dir):
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    start = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    out = {"load_s": round(time.perf_counter() - start, 2), "threads": torch.get_num_threads()}
    texts = [row["text"] for row in read_jsonl(f"{data_dir}/text/validation.jsonl")]
    start = time.perf_counter()
    result = perplexity(model, tokenizer, texts, 256, 12, 4)
    out["ppl"] = {key: result[key] for key in ("protocol", "ppl", "n_tokens")}
    out["ppl_s"] = round(time.perf_counter() - start, 2)
    ids, ids2 = torch.randint(100, 40000, (4, 256)), torch.randint(100, 40000, (16, 128))
    with torch.no_grad():
        out["forward_4x256_s"] = timed(lambda: model(ids))
        out["forward_16x128_s"] = timed(lambda: model(ids2))
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    out["forward_backward_4x256_s"] = timed(step, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
