"""The taming-transformers VQGAN (Esser et al. 2021, CompVis/taming-transformers) as used by
valeoai/Maskgit-pytorch: encoder, decoder and nearest-code quantizer with taming's state-dict
names, so MaskGIT-pytorch's released f16 checkpoint (`pretrained_maskgit/VQGAN/last.ckpt`) loads
key by key. A smaller configuration of the same architecture is the VQ-VAE that imagenet_masked.py
trains on your own images (`VQVAE` sizes, `build_vqvae`, `vqvae_loss`).

`build_vqgan(...)` makes the model from explicit sizes; `vqgan_state_dict(path)` reads a checkpoint
into the state dict that `VQModel` expects (errors: ValueError with a one-line message);
`load_vqgan(path, img_size)` reads the sizes off that state dict and loads it strictly.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H W positions, 1x1 convs q, k, v, proj_out."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)                                  # (B, HW, C)
        return x + self.proj_out(a.transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """Down: pad right/bottom by 1, 3x3 conv stride 2. Up: nearest x2, 3x3 conv."""

    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return m


def _middle(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m


class Encoder(nn.Module):
    """Image (N, 3, R, R) in [-1, 1] -> z (N, z_ch, R/f, R/f), f = 2^(len(ch_mult) - 1)."""

    def __init__(self, ch, ch_mult, n_res, attn_res, resolution, z_ch):
        super().__init__()
        self.conv_in, self.down = nn.Conv2d(3, ch, 3, padding=1), nn.ModuleList()
        c, res = ch, resolution
        for i, m in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(n_res):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
                if res in attn_res:
                    attns.append(AttnBlock(c))
            level = _level(blocks, attns)
            if i < len(ch_mult) - 1:
                level.downsample = Resample(c, down=True)
                res //= 2
            self.down.append(level)
        self.mid = _middle(c)
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, z_ch, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (N, z_ch, R/f, R/f) -> image (N, 3, R, R); `up[i]` mirrors the encoder's level i."""

    def __init__(self, ch, ch_mult, n_res, attn_res, resolution, z_ch):
        super().__init__()
        c, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in, self.mid = nn.Conv2d(z_ch, c, 3, padding=1), _middle(c)
        levels = []
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(n_res + 1):
                blocks.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
                if res in attn_res:
                    attns.append(AttnBlock(c))
            level = _level(blocks, attns)
            if i > 0:
                level.upsample = Resample(c, down=False)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """VQGAN / VQ-VAE: encoder -> quant_conv -> nearest code -> post_quant_conv -> decoder.

    Codes are argmin_k |z - e_k|^2 over `quantize.embedding` (K, dim). Training returns the
    VQ-VAE loss per image: mean squared reconstruction error + codebook term
    |sg[z] - e|^2 + 0.25 commitment |z - sg[e]|^2, straight-through gradients.
    """

    def __init__(self, K, dim, ch, ch_mult, n_res, attn_res, resolution):
        super().__init__()
        self.K, self.f = K, 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch, ch_mult, n_res, attn_res, resolution, dim)
        self.decoder = Decoder(ch, ch_mult, n_res, attn_res, resolution, dim)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(K, dim)
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / K, 1.0 / K)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)

    def _nearest(self, z):
        e = self.quantize.embedding.weight                                      # (K, dim)
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()              # (N h w, dim)
        d = zf.pow(2).sum(1, keepdim=True) + e.float().pow(2).sum(1) - 2 * zf @ e.float().T
        return d.argmin(1).view(z.shape[0], -1)                                 # (N, h w)

    def _embed(self, codes, h):
        e = self.quantize.embedding(codes)                                      # (N, h w, dim)
        return e.view(codes.shape[0], h, -1, e.shape[-1]).permute(0, 3, 1, 2)   # (N, dim, h, w)

    @torch.no_grad()
    def encode(self, x):
        """x (N, 3, R, R) in [-1, 1] -> codes (N, h w) long."""
        return self._nearest(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def decode(self, codes):
        """codes (N, h w) long -> images (N, 3, R, R), about [-1, 1]."""
        h = math.isqrt(codes.shape[1])
        return self.decoder(self.post_quant_conv(self._embed(codes, h)))

    def forward(self, x):
        z = self.quant_conv(self.encoder(x))                                    # (N, dim, h, w)
        codes = self._nearest(z.detach())
        e = self._embed(codes, z.shape[2])
        vq = ((z.detach() - e) ** 2 + 0.25 * (z - e.detach()) ** 2).flatten(1).mean(1)  # (N,)
        rec = self.decoder(self.post_quant_conv(z + (e - z).detach()))
        return ((rec - x) ** 2).flatten(1).mean(1) + vq, codes


def build_vqgan(*, codes: int, dim: int, ch: int, ch_mult, res_blocks: int, attn_res,
                img_size: int) -> VQModel:
    """VQModel with `codes` codebook entries of width `dim`, base width `ch`, per-level multipliers
    `ch_mult` (downsampling factor 2^(len(ch_mult) - 1)), `res_blocks` ResnetBlocks per level and
    attention at the resolutions in `attn_res`, for `img_size` x `img_size` images."""
    return VQModel(codes, dim, ch, ch_mult, res_blocks, attn_res, img_size)


VQVAE = {   # the VQ-VAE's sizes by image size (256: the f16 VQGAN's, 72.142M parameters)
    256: dict(codes=1024, dim=256, ch=128, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, attn_res=(16,)),
    64: dict(codes=1024, dim=256, ch=128, ch_mult=(1, 2, 2, 4), res_blocks=2, attn_res=(8,)),
    16: dict(codes=16, dim=8, ch=32, ch_mult=(1, 2), res_blocks=1, attn_res=(8,)),     # tests
}
VQVAE_ITERS, VQVAE_LR = {256: 100_000, 64: 100_000, 16: 3}, 2e-4


def build_vqvae(img_size: int) -> VQModel:
    return build_vqgan(**VQVAE[img_size], img_size=img_size)


def vqvae_loss(vq: VQModel):
    """The VQ-VAE's training loss (the training loop's loss_fn(model, batch, g)): images
    (B, 3, R, R) uint8 to [-1, 1], each mirrored with probability 1/2, VQModel's per-image loss;
    logs how many codes the batch used. No GAN or perceptual loss."""
    def loss_fn(model, batch, g):
        x = batch[0].float() / 127.5 - 1                                        # (B, 3, R, R)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g, device=x.device) < 0.5,
                        x.flip(-1), x)
        loss, codes = model(x)
        used = torch.zeros(vq.K, device=x.device).index_fill_(0, codes.flatten(), 1)
        return loss, {"codes_used": used.sum().expand(len(x))}
    return loss_fn


@torch.no_grad()
def encode_mirrored(vq: VQModel, batches, device) -> tuple:
    """(codes (2 N, h w) int, labels (2 N,)) of the N images of `batches` ((B, 3, R, R) uint8,
    labels) and their mirrors (image i at rows 2i, 2i + 1); () if there are none."""
    codes, labels = [], []
    for x, y in batches:
        x = x.to(device).float() / 127.5 - 1                                    # (B, 3, R, R)
        both = torch.stack([vq.encode(x), vq.encode(x.flip(-1))], 1)           # (B, 2, h w)
        codes.append(both.flatten(0, 1).int().cpu())
        labels.append(y.repeat_interleave(2))
    return (torch.cat(codes), torch.cat(labels)) if codes else ()


def vqgan_state_dict(path: str) -> dict:
    """MaskGIT-pytorch's VQGAN checkpoint (a Lightning checkpoint {"state_dict": ...}) -> the
    state dict of `VQModel` ("module." stripped). Keys under `loss.` (the LPIPS / discriminator
    of VQGAN training) are not part of the tokenizer and are skipped; the caller loads the result
    strictly."""
    if not os.path.isfile(path):
        raise ValueError(f"--vqgan_ckpt {path!r} not found (MaskGIT-pytorch's "
                         "download_models.py fetches pretrained_maskgit/VQGAN/last.ckpt)")
    st = torch.load(path, map_location="cpu", weights_only=False)
    sd = st.get("state_dict", st) if isinstance(st, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} holds no state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()
            if not k.startswith("loss.")}


def load_vqgan(path: str, img_size: int) -> VQModel:
    """MaskGIT-pytorch's VQGAN (`pretrained_maskgit/VQGAN/last.ckpt`, or any taming VQModel
    checkpoint) as a VQModel for img_size x img_size images, loaded strictly: the codebook, the
    widths, the levels, the ResnetBlocks per level and the levels with attention are read off
    the state dict's shapes and names. Any error stops the run with one line."""
    from pretrained import load_strict
    try:
        sd = vqgan_state_dict(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        K, dim = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    except KeyError as e:
        raise SystemExit(f"error: {path!r} is not a taming VQGAN checkpoint (no {e})") from None
    attn = [img_size >> i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    vq = build_vqgan(codes=K, dim=dim, ch=ch, ch_mult=tuple(mult), res_blocks=n_res,
                     attn_res=tuple(attn), img_size=img_size)
    return load_strict(vq, sd, f"VQGAN checkpoint {path!r} does not fit the taming architecture")
