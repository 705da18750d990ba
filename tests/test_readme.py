"""The README's core snippet ("Using the core in your own project") runs as written, on a tiny
conditional denoiser that the test supplies under the names the snippet uses (MyNet, teacher,
S, B, D, x0, t, u, labels)."""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("```python\nimport di4c_core as core\n") + len("```python\n")
    return text[start:text.index("```", start)]


class MyNet(torch.nn.Module):
    """logits (N, D, S) from x_t, t, the class label and (lam_dim = 1) a zero-initialised lambda
    path; [MASK] (S - 1) is never predicted."""

    def __init__(self, lam_dim=0, D=4, S=5, n_classes=3):
        super().__init__()
        self.D, self.S, self.lam_dim = D, S, lam_dim
        self.embed = torch.nn.Embedding(S, 8)
        self.label = torch.nn.Embedding(n_classes, 8)
        self.out = torch.nn.Linear(8 * D + 1, D * S)
        if lam_dim:
            self.lam_proj = torch.nn.Linear(1, D * S)
            torch.nn.init.zeros_(self.lam_proj.weight), torch.nn.init.zeros_(self.lam_proj.bias)

    def forward(self, x_t, t, lam=None, cond=None):
        h = (self.embed(x_t) + self.label(cond)[:, None]).flatten(1)
        logits = self.out(torch.cat([h, t.float()[:, None]], 1))
        if self.lam_dim:
            logits = logits + self.lam_proj(lam)
        logits = logits.view(-1, self.D, self.S)
        return logits.masked_fill(torch.arange(self.S) == self.S - 1, -1e4)


def test_readme_core_snippet_runs_as_written():
    torch.manual_seed(0)
    B, D, S = 3, 4, 5
    teacher = MyNet()
    ns = dict(torch=torch, MyNet=MyNet, teacher=teacher, S=S, B=B, D=D,
              x0=torch.randint(0, S - 1, (B, D)), t=torch.tensor([0.9, 0.5, 0.2]),
              u=torch.tensor([0.8, 0.4, 0.1]), labels=torch.tensor([0, 2, 1]))
    exec(compile(readme_snippet(), "README.md", "exec"), ns)
    loss, student = ns["loss"], ns["student"]
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert [g["lr"] for g in ns["opt"].param_groups] == [1e-5, 1e-4]
    x0_hat, nfe = ns["x0_hat"], ns["nfe"]
    assert x0_hat.shape == (B, D) and not (x0_hat == S - 1).any() and nfe in (4, 5)
