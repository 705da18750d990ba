"""valeoai/Maskgit-pytorch, exactly: the key map from its bidirectional transformer
(`MaskTransformer`, saved as checkpoint["model_state_dict"], e.g. the released
`MaskGIT_ImageNet_256.pth`) to the transformer of imagenet_masked.py, which computes the same
function under shorter module names; its sampler and schedule (`--sampler maskgit | di4c`)."""
import math

import numpy as np
import torch


def maskgit_to_ours(sd: dict) -> dict:
    """MaskGIT-pytorch's MaskTransformer state dict -> ours (pure renaming; "module." stripped).

    tok_emb -> embed, pos_emb -> pos, first_layer.i -> first.i, last_layer.i -> last.i,
    bias -> out_bias, transformer.layers.l.0.norm -> blocks.l.ln1, .0.fn.mha.* -> .attn.*,
    .1.norm -> .ln2, .1.fn.net.i -> .mlp.i; the Di4C authors' student (sony/di4c,
    maskgit-di4c-d.pth): latent_projection.* -> lam_token.* (lam_inject "token"). Unknown keys
    keep their names (a strict load then names them).
    """
    top = {"tok_emb.weight": "embed.weight", "pos_emb": "pos", "bias": "out_bias"}
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        p = k.split(".")
        if k in top:
            out[top[k]] = v
        elif p[0] == "latent_projection":
            out[".".join(["lam_token"] + p[1:])] = v
        elif p[0] in ("first_layer", "last_layer"):
            out[".".join([p[0].split("_")[0]] + p[1:])] = v
        elif p[:2] == ["transformer", "layers"] and len(p) >= 6:
            sub = {("0", "norm"): "ln1", ("1", "norm"): "ln2"}.get((p[3], p[4]))
            if sub:
                out[".".join(["blocks", p[2], sub] + p[5:])] = v
            elif p[3:6] == ["0", "fn", "mha"]:
                out[".".join(["blocks", p[2], "attn"] + p[6:])] = v
            elif p[3:6] == ["1", "fn", "net"]:
                out[".".join(["blocks", p[2], "mlp"] + p[6:])] = v
            else:
                out[k] = v
        else:
            out[k] = v
    return out


def upstream_schedule(n_steps: int, D: int) -> list:
    """MaskGIT-pytorch's `adap_sche(step, "arccos")`: tokens to reveal at each step, in
    proportion to arccos(r) / (pi / 2) for r = linspace(1, 0, steps) (float32), rounded, zeros
    raised to 1, the last absorbing the remainder. Needs 2 or more steps."""
    if n_steps < 2:
        raise SystemExit(f"error: --sampler maskgit needs 2 or more steps, got {n_steps} "
                         "(MaskGIT-pytorch's schedule divides by zero at 1)")
    val = torch.arccos(torch.linspace(1, 0, n_steps)) / (math.pi * 0.5)
    sche = (val / val.sum() * D).round()
    sche[sche == 0] = 1
    sche[-1] += D - sche.sum()
    if sche[-1] < 1:
        raise SystemExit(f"error: {n_steps} steps cannot reveal {D} tokens with MaskGIT-pytorch's "
                         "schedule")
    return sche.int().tolist()


@torch.no_grad()
def sample(net, lam_dim: int, y: torch.Tensor, sche: list, w: float, sm_temp: float,
           r_temp: float, generator: torch.Generator, rng: np.random.RandomState, uncond=None,
           variant: str = "maskgit") -> torch.Tensor:
    """MaskGIT-pytorch's `sample()` (randomize "linear", sched_mode "arccos"), step for step, on
    imagenet_masked.py's network: variant "maskgit" as valeoai/Maskgit-pytorch v1 (sche =
    upstream_schedule), "di4c" as the Di4C authors' copy (sche = imagenet_masked.reveal_counts,
    the draw from Categorical(logits), lambda for a student). Differences from the script's
    `maskgit_sample`: the schedule, the raw output over K + 1 classes ([MASK] can be drawn and
    revealed; clamped to K - 1 at the end, as upstream does before decoding), tokens revealed
    where confidence >= the t-th largest (ties reveal more, but only the top t leave the mask),
    the Gumbel noise from numpy's `rng`. A student draws lam = U[0, 1) from `generator` before
    each step's forward, shared by both CFG branches; the categorical draw is
    torch.multinomial on `generator` (what torch.distributions.Categorical.sample does), so a
    generator and a RandomState seeded like upstream's global RNGs replay upstream's draws.
    Args: y (N,) class ids. Returns x_0 (N, D) long in [0, K - 1].
    """
    D, K = net.D, net.K
    N, dev = y.shape[0], y.device
    code = torch.full((N, D), K, dtype=torch.long, device=dev)
    mask = torch.ones(N, D, dtype=torch.bool, device=dev)
    dropped = torch.full_like(y, net.n_classes)
    for k, t in enumerate(sche):
        left, ratio = int(mask.sum()), k / max(len(sche) - 1, 1)   # one step: no CFG
        t = min(t, left)
        if left == 0:
            break
        lam = torch.rand(N, lam_dim, generator=generator, device=dev) if lam_dim else None
        if w != 0 and uncond is None:                  # both CFG branches in one batch
            both = net.raw_logits(code.repeat(2, 1), None if lam is None else lam.repeat(2, 1),
                                  torch.cat([y, dropped])).float()
            logits, u_logits = both.chunk(2)                                    # (N, D, K + 1)
        else:
            logits = net.raw_logits(code, lam, y).float()                      # (N, D, K + 1)
            if w != 0:
                u_logits = uncond.raw_logits(code, None, dropped).float()
        if w != 0:
            logits = (1 + w * ratio) * logits - w * ratio * u_logits
        prob = torch.softmax(logits * sm_temp, -1)                          # (N, D, K + 1)
        if variant == "di4c":          # Categorical(logits=...): logits normalised first
            z = logits * sm_temp
            draw = torch.softmax(z - z.logsumexp(-1, keepdim=True), -1)
        else:                          # Categorical(probs=...): probabilities renormalised
            draw = prob / prob.sum(-1, keepdim=True)
        pred = torch.multinomial(draw.view(N * D, -1), 1, True, generator=generator).view(N, D)
        conf = prob.gather(-1, pred[..., None])[..., 0]                         # (N, D)
        gumbel = torch.from_numpy(r_temp * rng.gumbel(size=(N, D)) * (1 - ratio)).to(dev)
        conf = torch.log(conf) + gumbel                                         # float64
        conf[~mask] = -math.inf
        top, idx = conf.topk(t, dim=-1)                                         # (N, t)
        chosen = mask & (conf >= top[:, -1:])
        code[chosen] = pred[chosen]
        mask.scatter_(1, idx, False)
    return code.clamp(0, K - 1)
