"""Probe a GPU machine: versions, bf16 matmul rate, FLUX.1-dev-size transformer build and one step."""

import time

import torch

from artmaster.config import compose
from artmaster.models import build_random_pipeline

torch.backends.cuda.enable_cudnn_sdp(False)
print("torch", torch.__version__, torch.cuda.get_device_name())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ a
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    a @ a
torch.cuda.synchronize()
print(f"bf16 matmul {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
del a
cfg = compose(["model=flux_dev_random"])
t = time.perf_counter()
pipe = build_random_pipeline(cfg.model, with_text_encoders=False)
torch.cuda.synchronize()
print(f"build {time.perf_counter() - t:.1f}s, params {sum(p.numel() for p in pipe.transformer.parameters())/1e9:.2f}B")
tr = pipe.transformer
tr.requires_grad_(False)
x = torch.randn(1, 1024, 64, device="cuda", dtype=torch.bfloat16)
enc = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16)
img_ids = torch.zeros(1024, 3, device="cuda")
txt_ids = torch.zeros(512, 3, device="cuda")
x.requires_grad_(True)
for i in range(5):
    torch.cuda.synchronize(); t = time.perf_counter()
    out = tr(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
             timestep=torch.tensor([0.5], device="cuda"), img_ids=img_ids, txt_ids=txt_ids,
             guidance=torch.tensor([1.0], device="cuda"), return_dict=False)[0]
    out.float().pow(2).mean().backward()
    torch.cuda.synchronize(); print(f"fwd+bwd(input) {time.perf_counter() - t:.3f}s peak {torch.cuda.max_memory_allocated()/1e9:.1f}GB")
