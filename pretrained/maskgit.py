"""Key map from valeoai/Maskgit-pytorch's bidirectional transformer (`MaskTransformer`, saved as
checkpoint["model_state_dict"], e.g. the released `MaskGIT_ImageNet_256.pth`) to the transformer
of imagenet_masked.py, which computes the same function under shorter module names."""


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
