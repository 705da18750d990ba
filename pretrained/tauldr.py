"""andrew-cr/tauLDR checkpoints (Campbell et al. 2022) <-> the U-Net of cifar10_gaussian.py.

tauLDR saves checkpoint["model"] = the state dict of its EMA model class: "net.<name>"
("net.module.<name>" after DDP) = raw training weights, "ema_shadow_params" = the EMA weights as a
list in the order of those parameters, plus "ema_decay", "ema_num_updates". Our U-Net holds the
same blocks in the same order under other names; `tauldr_to_ours` / `ours_to_tauldr` map the keys,
`is_tauldr_checkpoint` recognises the layout, `check_and_convert` checks a checkpoint key by key
against a network before mapping it, and `load_ema_weights` (cifar10_gaussian.load_net) does
both for a file. The Di4C authors' student (sony/di4c, `tldr-di4c.pt`) has the same layout plus
its lambda path (tlam_mix, lemb_modules, h_t_lam_mix, hlemb_modules, and dense1 in every
ResBlock), which is ours (lam_emb_down, lam_emb_up, lam_proj) under other names. Errors are
ValueError with a one-line message (SystemExit from load_ema_weights).
"""
import torch


TOP_MODULES = {"temb_modules.0": "temb.0", "temb_modules.1": "temb.2", "input_conv": "conv_in",
               "output_modules.0": "out.0", "output_modules.1": "out.2",
               # the Di4C authors' student (sony/di4c tauldr, do_lam_embed): the (lambda, t)
               # embedding before the bottleneck and the (lambda, t, bottleneck mean) one after
               "tlam_mix": "lam_emb_down.0", "lemb_modules.0": "lam_emb_down.2",
               "lemb_modules.1": "lam_emb_down.4", "h_t_lam_mix": "lam_emb_up.0",
               "hlemb_modules.0": "lam_emb_up.2", "hlemb_modules.1": "lam_emb_up.4"}
MODULE_LISTS = {"downsampling_modules": "down", "middle_modules": "mid", "upsampling_modules": "up"}
LEAF_MODULES = {"groupnorm0": "n1", "conv0": "c1", "dense0": "t_proj", "dense1": "lam_proj",
                "groupnorm1": "n2", "conv1": "c2",
                "GroupNorm_0": "n", "conv": "conv", "nin": "skip", "NIN_3": "out"}   # NIN_0..2 -> qkv
NIN_PARAMS = {"W": "weight", "b": "bias"}     # NiN: y = x W + b, W (in, out) = 1x1 conv weight^T
EMA_KEYS = ("ema_decay", "ema_num_updates", "ema_shadow_params")


def strip_ddp(k: str) -> str:
    """A key without DDP's "module." (a leading one and every ".module.")."""
    k = k[len("module."):] if k.startswith("module.") else k
    return k.replace(".module.", ".")


def tauldr_to_ours(sd: dict, ema: bool = True) -> dict:
    """tauLDR checkpoint["model"] -> our UNet state dict (pure renaming and reshaping).

    ema=True (default) takes the EMA weights `ema_shadow_params`, which is what tauLDR samples with
    (its model.eval() copies them into the network); ema=False takes the raw `net.*` training weights.
    Renames: temb_modules.{0,1} -> temb.{0,2}, input_conv -> conv_in, downsampling/middle/upsampling
    _modules.i -> down/mid/up.i (same i), output_modules.{0,1} -> out.{0,2}; ResBlock groupnorm0,
    conv0, dense0, groupnorm1, conv1, nin -> n1, c1, t_proj, n2, c2, skip; attention GroupNorm_0 ->
    n, NIN_0..2 fused into qkv, NIN_3 -> out; NiN W (in, out) -> conv weight (out, in, 1, 1).
    A key it does not recognise is kept under its own name, so a strict load names it.
    """
    sd = {strip_ddp(k): v for k, v in sd.items()}
    names = [k for k in sd if k.startswith("net.")]
    if ema:
        shadow = sd.get("ema_shadow_params")
        if shadow is None or len(shadow) != len(names) or any(
                s.shape != sd[k].shape for s, k in zip(shadow, names)):
            n = "absent" if shadow is None else f"{len(shadow)} tensors"
            raise ValueError(f"tauLDR checkpoint: ema_shadow_params ({n}) does not line up with its "
                             f"{len(names)} net.* parameters (same order and shapes expected)")
        sd.update(zip(names, shadow))
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in EMA_KEYS:
            continue
        p = k.split(".")
        top = ".".join(p[1:-1])
        if p[0] == "net" and top in TOP_MODULES:
            out[f"{TOP_MODULES[top]}.{p[-1]}"] = v
        elif p[0] == "net" and len(p) == 5 and p[1] in MODULE_LISTS and p[3] in ("NIN_0", "NIN_1", "NIN_2") \
                and p[4] in NIN_PARAMS:
            qkv.setdefault((MODULE_LISTS[p[1]], p[2], p[4]), {})[int(p[3][-1])] = (k, v)
        elif p[0] == "net" and len(p) == 5 and p[1] in MODULE_LISTS and p[3] in LEAF_MODULES:
            if p[3] in ("nin", "NIN_3") and p[4] in NIN_PARAMS:
                out[f"{MODULE_LISTS[p[1]]}.{p[2]}.{LEAF_MODULES[p[3]]}.{NIN_PARAMS[p[4]]}"] = \
                    v.t()[:, :, None, None].contiguous() if p[4] == "W" else v
            else:
                out[f"{MODULE_LISTS[p[1]]}.{p[2]}.{LEAF_MODULES[p[3]]}.{p[4]}"] = v
        else:
            out[k] = v                                                          # unrecognised
    for (lst, i, param), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:                                          # incomplete: keep names
            out.update(dict(parts.values()))
        elif param == "W":
            out[f"{lst}.{i}.qkv.weight"] = torch.cat([parts[j][1].t() for j in range(3)])[:, :, None, None]
        else:
            out[f"{lst}.{i}.qkv.bias"] = torch.cat([parts[j][1] for j in range(3)])
    return out


def ours_to_tauldr(sd: dict) -> dict:
    """Inverse of `tauldr_to_ours` for a teacher: our state dict -> tauLDR "net.*" keys (no EMA entries)."""
    top = {v: k for k, v in TOP_MODULES.items()}
    lists, leaf, nin = ({v: k for k, v in d.items()} for d in (MODULE_LISTS, LEAF_MODULES, NIN_PARAMS))
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if ".".join(p[:-1]) in top:
            out[f"net.{top['.'.join(p[:-1])]}.{p[-1]}"] = v
        elif len(p) == 4 and p[0] in lists and p[2] == "qkv":                  # tauLDR order: W, b per NIN
            if p[3] == "weight":
                for j, (w, b) in enumerate(zip(v.chunk(3), sd[k[:-len("weight")] + "bias"].chunk(3))):
                    out[f"net.{lists[p[0]]}.{p[1]}.NIN_{j}.W"], out[f"net.{lists[p[0]]}.{p[1]}.NIN_{j}.b"] = \
                        w[:, :, 0, 0].t(), b
        elif len(p) == 4 and p[0] in lists and p[2] in leaf:
            name = leaf[p[2]]
            if name in ("nin", "NIN_3"):
                out[f"net.{lists[p[0]]}.{p[1]}.{name}.{nin[p[3]]}"] = v[:, :, 0, 0].t() if p[3] == "weight" else v
            else:
                out[f"net.{lists[p[0]]}.{p[1]}.{name}.{p[3]}"] = v
        else:
            out[k] = v
    return out


def check_and_convert(net: torch.nn.Module, model_sd: dict, path: str) -> dict:
    """Check tauLDR's checkpoint["model"] key by key (in tauLDR's names) against `net`; map it."""
    want = ours_to_tauldr(net.state_dict())
    have = {strip_ddp(k): v for k, v in model_sd.items() if k not in EMA_KEYS}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    shapes = [f"{k} {tuple(have[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in have and getattr(have[k], "shape", None) != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"tauLDR checkpoint {path!r} does not match this network (S {net.S}, C {net.C}, "
                         f"ch {net.ch}; --ch/--ch_mult/--num_res_blocks/--attn_res; the released CIFAR-10 "
                         f"checkpoint needs the paper preset): missing keys {missing[:10]}"
                         f"{f' (+{len(missing) - 10})' if len(missing) > 10 else ''}, unexpected keys "
                         f"{unexpected[:10]}{f' (+{len(unexpected) - 10})' if len(unexpected) > 10 else ''}, "
                         f"shape mismatches (checkpoint vs network) {shapes[:10]}")
    return tauldr_to_ours(model_sd)


def is_tauldr_checkpoint(st) -> bool:
    """tauLDR's layout: checkpoint["model"] with net.* / ema_* keys and no "config" (ours has one)."""
    m = st.get("model") if isinstance(st, dict) else None
    return isinstance(m, dict) and "config" not in st and any(
        strip_ddp(k).startswith("net.") or k in EMA_KEYS for k in m)


def load_ema_weights(path: str, net: torch.nn.Module):
    """The EMA weights of a checkpoint file in tauLDR's layout (tauLDR's own, or the Di4C
    authors' student), checked against `net` and mapped onto its names; None when the file is
    not in tauLDR's layout. A file that cannot be read or does not match stops with one line."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path!r} ({type(e).__name__})") from None
    if not is_tauldr_checkpoint(st):
        return None
    try:
        return check_and_convert(net, st["model"], path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
