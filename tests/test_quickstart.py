"""The original framework's Quick Start, as its README wrote it, runs against this package.

Its three snippets (basic usage, the training loop, the knowledge-graph query) are kept
below as users copy them, with two changes only: the package is `pipeline` (the framework
called it ``moe_framework``), and on a machine without CUDA the ``.cuda()`` calls are
dropped. The snippets leave ``dataloader`` to the reader; the test gives one. On the CPU
`torch.compile` is switched off through PyTorch's own ``TORCHDYNAMO_DISABLE`` (compiling this
model there takes about a minute, and CI runs without a GPU); the model's config is the
snippet's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Fresh interpreters importing torch: seconds each, out of the editing tier.
pytestmark = pytest.mark.slow

BASIC = """
from pipeline import MoEConfig, FullyOptimizedMoESystem
import torch

# Configure MoE system
config = MoEConfig(
    input_dim=512,
    hidden_dim=2048,
    output_dim=512,
    num_experts=32,
    top_k_experts=3,
)

# Initialize
model = FullyOptimizedMoESystem(config).cuda()

# Inference
model.eval()
with torch.no_grad():
    x = torch.randn(8, 128, 512).cuda()
    output = model(x)  # (8, 128, 512)
"""

TRAINING = """
# Setup
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
loss_fn = torch.nn.MSELoss()

# Training loop
model.train()
for batch in dataloader:
    loss = model.training_step(batch, optimizer, loss_fn)
    print(f'Loss: {loss:.4f}')
"""

QUERY = """
# Query for similar past insights
query_embedding = torch.randn(512).cuda()
results = model.query_knowledge_graph(query_embedding, top_k=5)

for result in results:
    print(f"Node {result['node_id']}: "
          f"Similarity={result['similarity']:.3f}")
"""

# What the reader brings: a few (inputs, targets) batches, and checks of what came out.
DATALOADER = """
dataloader = [(torch.randn(4, 16, 512), torch.randn(4, 16, 512)) for _ in range(3)]
"""
CHECKS = """
assert tuple(output.shape) == (8, 128, 512), output.shape
assert all(isinstance(r["node_id"], str) and -1.0 <= r["similarity"] <= 1.0 for r in results)
print("results", len(results))
"""


def test_the_original_quick_start_runs_as_written(tmp_path):
    import torch

    cuda = torch.cuda.is_available()
    script = "\n".join([BASIC, DATALOADER, TRAINING, QUERY, CHECKS])
    if not cuda:
        script = script.replace(".cuda()", "")
    env = {**os.environ, "MOE_STATE_DIR": str(tmp_path / "state")}
    if not cuda:
        env["TORCHDYNAMO_DISABLE"] = "1"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split()[1]) for line in out.stdout.splitlines()
              if line.startswith("Loss:")]
    assert len(losses) == 3 and all(loss > 0 for loss in losses), out.stdout
    # No graph in a fresh state dir: the query answers an empty list, not an error.
    assert "results 0" in out.stdout, out.stdout
