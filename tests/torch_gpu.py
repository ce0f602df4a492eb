"""PyTorch's LoRA training step on a CUDA GPU: ../shared/tools/torch_baseline.py's
`train` mode (LoRA r 8 / alpha 16 on q_proj and v_proj, AdamW, batch x seq random
tokens, loss on every position), on the GPU, synchronized before each clock read.
tests/gpu.sh runs it beside `fedtune bench train-step --device cuda`.
Usage: python3 tests/torch_gpu.py GGUF [--dtype float32|bfloat16] [--batch 4] [--seq 128]"""
import argparse, json, os, statistics, time

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=10)
a = ap.parse_args()

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
d, f = os.path.split(os.path.abspath(a.gguf))
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=getattr(torch, a.dtype)).cuda()
n_params = sum(p.numel() for p in model.parameters())
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (a.batch, a.seq), device="cuda")
times = []
for i in range(a.steps + 1):
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    torch.cuda.synchronize()
    if i:
        times.append(time.perf_counter() - t)
s = statistics.median(times)
print(json.dumps({
    "stack": f"torch {torch.__version__}", "device": torch.cuda.get_device_name(), "dtype": a.dtype,
    "batch": a.batch, "seq": a.seq, "step_s_median": round(s, 4), "step_s_min": round(min(times), 4),
    "gflop_per_s": round(4 * n_params * a.batch * a.seq / s / 1e9, 1),
    "max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
}))
