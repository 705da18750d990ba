"""valeoai/Maskgit-pytorch, exactly: the key map from its bidirectional transformer
(`MaskTransformer`, saved as checkpoint["model_state_dict"], e.g. the released
`MaskGIT_ImageNet_256.pth`) to the transformer of imagenet_masked.py, which computes the same
function under shorter module names; the Di4C authors' lambda token (their released student
`maskgit-di4c-d.pth`; `--sampler di4c` gives a new student one); the sampler and schedule (the
authors' variant is `--sampler di4c`); its images (ImageFolder, Resize + CenterCrop)."""
import math
import os

import numpy as np
import torch
import torch.nn as nn


def read_image(path: str):
    """ImageFolder's loader: an RGB PIL image, or a ValueError that names the unreadable file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__})") from None


def image_folder(root: str, img_size: int):
    """root/<class>/ as an ImageFolder of (3, img_size, img_size) uint8 images: MaskGIT-pytorch's
    evaluation transform (short side resized to img_size, centre crop)."""
    import torchvision
    from torchvision import transforms as T
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root!r} is not a folder of class sub-folders (--data_dir, "
                         "--dataset)")
    tf = T.Compose([T.Resize(img_size), T.CenterCrop(img_size), T.PILToTensor()])
    try:
        return torchvision.datasets.ImageFolder(root, transform=tf, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: no images under {root!r} ({e})") from None


def image_batches(ds, workers: int = 0):
    """Batches (images (B, 3, R, R) uint8, labels (B,)) of a dataset; an unreadable file stops
    the run with one line (a worker's error arrives wrapped, its last line names the file)."""
    try:
        yield from torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)
    except ValueError as e:
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}") from None


def load_images(ds, workers: int = 0) -> tuple:
    """All of a dataset in memory: (images (N, 3, R, R) uint8, labels (N,) long)."""
    xs, ys = zip(*image_batches(ds, workers))
    return torch.cat(xs), torch.cat(ys)


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


class LambdaToken(nn.Sequential):
    """The Di4C authors' lambda path (sony/di4c, `latent_projection`): the lambda embedding
    (N, 128) -> Linear(128, 512) -> GELU -> Linear(512, E) is appended as one more token after
    the position embedding (the network drops it after its output MLP). A token changes every
    attention normaliser even with a zero embedding, so such a student cannot start equal to its
    teacher (ours adds the path to every token instead, zero at init: docs/method.md (14))."""

    def __init__(self, E: int):
        super().__init__(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, E))

    def append(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h (N, T, E), emb (N, 128) -> (N, T + 1, E)."""
        return torch.cat([h, self(emb)[:, None].to(h.dtype)], 1)


def load_released(state: dict, build, path: str):
    """A MaskGIT-pytorch checkpoint ({"model_state_dict": ...}: the released teacher, or the
    authors' student, recognised by its lambda token) -> build(lam_dim) with its weights,
    loaded strictly."""
    from pretrained import load_strict
    sd = maskgit_to_ours(state["model_state_dict"])
    return load_strict(build(int("lam_token.0.weight" in sd)), sd,
                       f"{path!r} does not fit this transformer (K, D, classes, --n_layer/"
                       "--n_embd/--n_head/--mlp_dim)")


def upstream_schedule(n_steps: int, D: int) -> list:
    """MaskGIT-pytorch's `adap_sche(step, "arccos")`: tokens to reveal at each step, in
    proportion to arccos(r) / (pi / 2) for r = linspace(1, 0, steps) (float32), rounded, zeros
    raised to 1, the last absorbing the remainder. Needs 2 or more steps."""
    if n_steps < 2:
        raise SystemExit(f"error: MaskGIT-pytorch's sampler needs 2 or more steps, got {n_steps} "
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
