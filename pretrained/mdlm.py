"""MDLM / SDTT / Di4C-SDTT text checkpoints -> the DiT of owt_masked.py.

owt_masked.py's DiT uses MDLM's parameter names, so a released checkpoint maps by stripping
prefixes. Formats read (no network access, no third-party package):
  * Lightning checkpoints of MDLM (kuleshov-group/mdlm), SDTT (jdeschena/sdtt) and the Di4C
    authors' SDTT students (sony/di4c, e.g. sdtt7-di4c2.ckpt): checkpoint["state_dict"] with
    "backbone." (twice when the student started from the Hugging Face MDLM) and "_orig_mod."
    (torch.compile) prefixes, and checkpoint["ema"]["shadow_params"], the EMA weights as a list
    in the order of the backbone's parameters;
  * model.safetensors of the Hugging Face releases (kuleshov-group/mdlm-owt and the revisions of
    jdeschena/sdtt), read by `read_safetensors`;
  * a bare state dict saved with torch.save.
The authors' students append lambda as a token (`append_lam_token`); their
"latent_projection" becomes our "lam_token" (owt_masked.DiT with lam_inject="token").
`load_released` is what owt_masked.py calls; the lower-level errors are one-line ValueErrors.
"""
import json
import pickle
import re

import numpy as np
import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
PREFIXES = ("_orig_mod.", "module.", "backbone.", "model.")
RENAMES = {"latent_projection.": "lam_token."}         # the authors' lambda token
IGNORED = ("rotary_emb.inv_freq",)                     # recomputed; checked against the heads
NOT_BACKBONE = ("noise.", "teacher.")                  # other modules of the Lightning class


def read_safetensors(path: str) -> dict:
    """A .safetensors file -> {name: tensor}: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}} and the raw little-endian bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())                     # one buffer; tensors are views of it
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not supported")
        dtype, numel = SAFETENSORS_DTYPES[info["dtype"]], int(np.prod(info["shape"], dtype=np.int64))
        out[name] = (torch.frombuffer(data, dtype=dtype, count=numel,
                                      offset=info["data_offsets"][0]) if numel else
                     torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return out


class _Stub:
    """Stands in for a pickled object of a package that is not installed (omegaconf configs,
    Lightning loop states): the weights never need them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Stub,), {})


class _TolerantPickle:
    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)


def read_file(path: str):
    """The object in a checkpoint file: safetensors, or a torch pickle (tensors only if possible,
    else unpickled with stand-ins for classes of packages that are not installed)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_TolerantPickle)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise ValueError(f"not a torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def strip(key: str) -> str:
    """A key without the wrappers' prefixes, with the authors' lambda names mapped to ours."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    key = key.replace("._orig_mod.", ".")
    for old, new in RENAMES.items():
        key = new + key[len(old):] if key.startswith(old) else key
    return key


def backbone_weights(obj) -> tuple:
    """A checkpoint object -> (weights {our name: tensor}, EMA weights or None).

    The EMA shadow list is matched to the backbone's parameters in their stored order (MDLM and
    SDTT save the state dict and the shadow list from the same parameter iteration)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict of tensors (nor a Lightning checkpoint with one)")
    weights = {}
    for k, v in sd.items():
        name = strip(k)
        if name.startswith(NOT_BACKBONE):
            continue
        weights[name] = v
    ema = None
    shadow = obj.get("ema", {}).get("shadow_params") if isinstance(obj.get("ema"), dict) else None
    if shadow is not None:
        params = [k for k in weights if k not in IGNORED]
        if len(params) != len(shadow) or any(weights[k].shape != s.shape
                                             for k, s in zip(params, shadow)):
            raise ValueError(f"the EMA has {len(shadow)} tensors that do not match the "
                             f"{len(params)} backbone parameters")
        ema = dict(zip(params, shadow))
    return weights, ema


def describe(weights: dict) -> dict:
    """Architecture read off the weights: {S, E, n_layer, cond_dim, lam_dim, lam_inject}."""
    try:
        S, E = weights["vocab_embed.embedding"].shape
        cond_dim = weights["sigma_map.mlp.2.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"no {e.args[0]!r}: not an MDLM-style DiT checkpoint") from None
    blocks = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
    lam_dim, inject = 0, "adaln"
    for prefix, kind in (("lam_token.0.weight", "token"), ("lam_mlp.0.weight", "adaln")):
        if prefix in weights:
            width = weights[prefix].shape[1]
            if width != 128:                    # sinusoid(1000 lam) of a 1-dimensional lambda
                raise ValueError(f"{prefix} takes {width} inputs: a {width / 128:g}-dimensional "
                                 "lambda; owt_masked.py's students have a 1-dimensional one "
                                 "(128 inputs)")
            lam_dim, inject = 1, kind
    return dict(S=S, E=E, n_layer=len(blocks), cond_dim=cond_dim, lam_dim=lam_dim,
                lam_inject=inject)


def load_into(net: torch.nn.Module, weights: dict, head_dim: int) -> None:
    """Strict load of converted weights into our DiT; one-line ValueError naming the first
    missing, unexpected or mis-shaped tensor (e.g. a --n_head that does not match)."""
    inv = weights.get("rotary_emb.inv_freq")
    if inv is not None:
        ours = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        if inv.shape != ours.shape or not torch.allclose(inv.float(), ours):
            raise ValueError(f"rotary frequencies of head width {2 * len(inv)}, the network's "
                             f"heads are {head_dim} wide: check --n_head")
    sd = {k: v for k, v in weights.items() if k not in IGNORED}
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"{len(missing)} missing (first {missing[:1]}) and {len(unexpected)} "
                         f"unexpected (first {unexpected[:1]}) tensors")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the checkpoint, "
                             f"{tuple(own[k].shape)} in the network")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def load_released(path: str, want: dict, build, use_ema: bool = True) -> tuple:
    """A released MDLM / SDTT teacher or Di4C-SDTT student -> (network, lam_dim): the network
    comes from build(lam_dim, lam_inject) as the file describes it and gets the file's weights
    (its EMA if it has one and use_ema). want: {S, E, n_layer, cond_dim} of the caller's
    configuration; a mismatch or an unreadable file stops with one line naming the flag."""
    try:
        weights, ema = backbone_weights(read_file(path))
        arch = describe(weights)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot read {path!r}: {e}") from None
    flag = dict(S="--remap_vocab false (GPT-2's 50,257 ids + [MASK])", E="--n_embd",
                n_layer="--n_layer", cond_dim="--cond_dim")
    bad = [f"{k} {arch[k]} in the file vs {v} here ({flag[k]})" for k, v in want.items()
           if arch[k] != v]
    if bad:
        raise SystemExit(f"error: {path!r} does not fit this configuration: " + "; ".join(bad))
    net = build(arch["lam_dim"], arch["lam_inject"])
    try:
        load_into(net, ema if use_ema and ema is not None else weights, net.hd)
    except ValueError as e:
        raise SystemExit(f"error: {path!r}: {e}") from None
    return net, arch["lam_dim"]


def append_lam_token(h: torch.Tensor, tok: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple:
    """The authors' lambda injection (sony/di4c's SDTT student): the lambda embedding tok (N, E)
    is appended to the tokens h (N, D, E) as one more token, left unrotated (a rotary row of
    cos 1, sin 0); the network drops its output. A token changes every attention normaliser,
    so such a student cannot start equal to its teacher. Returns h (N, D + 1, E), cos, sin."""
    cos = torch.cat([cos, cos.new_ones(1, cos.shape[1])])
    sin = torch.cat([sin, sin.new_zeros(1, sin.shape[1])])
    return torch.cat([h, tok[:, None].to(h.dtype)], 1), cos, sin


@torch.no_grad()
def sdtt_sample(net, x_T: torch.Tensor, n_steps: int, lam_dim: int = 0,
                eps: float = 1e-5, noise_eps: float = 1e-3) -> tuple:
    """SDTT's ancestral sampler (jdeschena/sdtt MultiRoundSDTT.sample, sampler="ancestral"; the
    authors' Di4C copy is the same), step for step, for comparing with their numbers:

    times linspace(1, eps, N + 1) in float32; log-linear noise, move chance
    m(t) = 1 - exp(log1p(-(1 - noise_eps) t)); at t = t_k, with dt = (1 - eps) / N,
    q = p_{0|t}(x) (m(t) - m(t - dt)) and q[MASK] = m(t - dt); each [MASK] takes
    argmax q / (1e-10 - log(u + 1e-10)), u ~ U[0, 1) in float32 from torch's global RNG
    (revealed tokens stay); if a [MASK] is left, one more NFE at t = eps takes the argmax over
    the tokens. p_{0|t} is SUBS normalised as SDTT does (logits - logsumexp). A Di4C student gets
    lambda ~ U[0, 1] per sample at every NFE, drawn on the CPU before the noise, as the authors'
    network draws it inside its forward. Our sampler (core.ancestral_sample) draws in float64
    from a generator instead. Returns (x_0 (B, D) long, NFE).
    """
    B, dev, mask_id = x_T.shape[0], x_T.device, net.mask_id
    ts = torch.linspace(1.0, eps, n_steps + 1)                              # float32, CPU
    dt = (1 - eps) / n_steps

    def move_chance(t):                                                       # (B,) float32
        return 1 - torch.exp(-(-torch.log1p(-(1 - noise_eps) * t)))

    def step(x, i):
        lam = torch.rand(B, lam_dim).to(dev) if lam_dim else None             # (B, 1)
        logits = net(x, None, lam).float()                                    # (B, D, S)
        p0 = (logits - torch.logsumexp(logits, -1, keepdim=True)).exp()
        t = ts[i] * torch.ones(B, device=dev)
        m_t, m_s = move_chance(t), move_chance(t - dt)
        q = p0 * (m_t - m_s)[:, None, None]
        q[:, :, mask_id] = m_s[:, None]
        return q

    x = x_T
    for i in range(n_steps):
        q = step(x, i)
        update = (q / (1e-10 - (torch.rand_like(q) + 1e-10).log())).argmax(-1)   # (B, D)
        x = torch.where(x != mask_id, x, update)
    if not (x == mask_id).any():
        return x, n_steps
    q = step(x, n_steps)
    q[:, :, mask_id] = -float("inf")
    return torch.where(x != mask_id, x, q.argmax(-1)), n_steps + 1
