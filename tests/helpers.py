"""Builders shared by the test files: episodes, model weights that no check passes by symmetry, attention that
is far from uniform, and files in the layouts of other projects (the authors' checkpoints, ImageNet weights)."""

import re

import torch
import torch.nn.functional as F

from dcama.model import StageAttention
from kernels.fused import CALL_COLUMNS, main_loop_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Gain on the attention projections: the scores grow with its square. With random weights the softmax is
# almost uniform (mean top weight ~1.5/Nk on ResNet-18 at 64 px), so a fault that mixes heads, positions or
# mask values changes the output by less than any tolerance; at 8 most of each row's weight sits on a few
# support tokens (mean top weight ~0.6).
PEAK_GAIN = 8.0
# The fused kernels' (forward, gradients) relative-error bounds against float64 (`rel_err`).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# fp32 inputs at TF32 ("high"): the forward's products take P, the value and the keys as fp16 (TF32's 10 mantissa
# bits; kernels.ops.forward_operands), which the interpreter rounds as a GPU does (it computes TF32 dots in fp32).
# Measured there: output 2e-5 to 1e-4, dq 1.4e-4 to 1.6e-4 with peaked softmax and offset keys; with the keys
# rounded to fp16 once instead of as a hi / lo pair, dq 1.2e-3 to 1.6e-3, which the gradient bound rejects. The
# dk/dv kernel's dv and dk products at TF32 take P~, dS, q and dO' rounded to fp16 (kernels.ops.backward_operands):
# dk 2.6e-4 to 4.8e-4, dv 1.3e-4 to 1.9e-4 there.
TF32_TOLERANCE = (5e-4, 1e-3)
# What the key and query counts run past the last full tile: never a multiple of a block.
KEY_TAIL, ROW_TAIL = 13, 7


def episode(batch=1, shots=1, size=64, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=g)
    support = torch.randn(batch, shots, 3, size, size, generator=g)
    # Blobby masks so that the bilinear resizing gives fractional values too.
    masks = (F.avg_pool2d(torch.rand(batch * shots, 1, size, size, generator=g), 9, 1, 4) > 0.5).float()
    # Foreground on the left edge, background on the right: every resized mask holds both values, so the
    # attention's gradient does not vanish at the 1x1 or 2x2 stages.
    masks[..., 0], masks[..., -1] = 1.0, 0.0
    return query.to(device), support.to(device), masks.view(batch, shots, size, size).to(device)


def randomise_(model, seed=0):
    """Non-trivial normalisation weights, biases and batch-norm statistics (timm zero-initialises the last
    BN of each block and the biases), so that no check passes by symmetry; matrices keep their random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.dim() != 1:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:  # biases and running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def peaked_(model, gain=PEAK_GAIN):
    """Scale every attention projection of a DCAMA model by `gain`: the softmax becomes far from uniform."""
    with torch.no_grad():
        for block in model.head.DCAMA_blocks:
            for linear in block.linears:
                linear.weight.mul_(gain)
                linear.bias.mul_(gain)
    return model


def peaked_stage_attention(layers, channels, n_query, n_key, batch=2, gain=PEAK_GAIN, seed=0, device=DEVICE):
    """A StageAttention with its projections scaled by `gain` (peaked softmax) and random tokens for it:
    (module, query (B, Nq, L, C), support (B, Nk, L, C), mask (B, Nk))."""
    torch.manual_seed(seed)
    module = StageAttention(channels).to(device).eval()
    with torch.no_grad():
        for linear in module.linears:
            linear.weight.mul_(gain)
    query = torch.randn(batch, n_query, layers, channels, device=device)
    support = torch.randn(batch, n_key, layers, channels, device=device)
    mask = torch.rand(batch, n_key, device=device)
    return module, query, support, mask


def stage_attention_reference(module, query, support, mask):
    """StageAttention layer by layer in plain PyTorch, 8 heads of C/8: the per-layer output (B, L, Nq), the
    mean over its heads of softmax(q k^T / sqrt(C/8)) @ mask, and each layer's probabilities."""
    batch, n_query, layers, channels = query.shape
    head_dim = channels // 8
    outputs, probs = [], []
    for layer in range(layers):
        q = module.linears[0](query[:, :, layer]).view(batch, n_query, 8, head_dim).transpose(1, 2)
        k = module.linears[1](support[:, :, layer]).view(batch, -1, 8, head_dim).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)
        probs.append(p)
        outputs.append((p @ mask[:, None, :, None]).mean(dim=1)[..., 0])
    return torch.stack(outputs, dim=1), probs


def nearest(mask, size):
    """A (H, W) label map resized to size x size by nearest neighbour, as the data sets resize masks."""
    return F.interpolate(torch.as_tensor(mask).float()[None, None], size=(size, size), mode="nearest")[0, 0].long()


def microsoft_swin_state(net):
    """timm Swin weights in Microsoft's layout: patch merging at the end of the previous stage, plus the
    relative_position_index and attn_mask buffers and the ImageNet classifier."""
    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in net.state_dict().items()}
    for i, stage in enumerate(net.layers):
        for j, block in enumerate(stage.blocks):
            out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                out[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask
    out["head.weight"] = torch.zeros(1000, net.num_features, device=out["norm.weight"].device)
    out["head.bias"] = torch.zeros(1000, device=out["norm.weight"].device)
    return out


def torchvision_resnet_state(net):
    """timm ResNet weights as torchvision/timm files hold them, classifier included."""
    out = dict(net.state_dict())
    out["fc.weight"] = torch.zeros(1000, net.num_features, device=out["conv1.weight"].device)
    out["fc.bias"] = torch.zeros(1000, device=out["conv1.weight"].device)
    return out


def authors_state(model):
    """What the authors' DDP-wrapped training saved for this model's weights."""
    net = model.backbone.net
    backbone = microsoft_swin_state(net) if model.backbone.spec.kind == "swin" else torchvision_resnet_state(net)
    out = {f"module.feature_extractor.{k}": v for k, v in backbone.items()}
    # Their files hold every buffer, the positional encodings the model computes too (not in our state dict).
    head = {**dict(model.named_buffers()), **model.state_dict()}
    out.update({f"module.model.{k[len('head.'):]}": v for k, v in head.items() if k.startswith("head.")})
    return out


def exit_status(main, argv):
    """What a command line's main(argv) exits with, argparse's own exits (bad flag syntax) included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def rel_err(actual, expected):
    """max|a - b| / max|b| in float64; the plain max|a - b| where the reference is exactly zero
    (dq with a single key token)."""
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err / scale if scale > 0 else err


def covering_shape(metas: dict[str, dict[str, int]], drop_bits: int, dot_precision: str | None = None,
                   rescale_per_step: bool = False) -> tuple[int, int]:
    """The smallest (Nq, Nk) on which each kernel, given its constexprs metas[kernel], runs every path of its key
    loop: the forward and dq main loop once (one step: `main_loop_tiles` key tiles; with 1-bit dropout over the
    keys of a whole Philox call, so that a loop stepping one tile meets every tile position in a call), the
    leftover full tile where that step is several tiles, and the masked last key tile; a dk/dv program owns its
    KEY_TILES key tiles: one full program, then a partial one. Every kernel also runs a full query tile and
    the masked query-row tail. dot_precision and rescale_per_step: the launch's (`main_loop_tiles`)."""
    n_key = 0
    for kernel, meta in metas.items():
        tiles = main_loop_tiles(kernel, drop_bits, meta["BLOCK_N"], meta.get("KEY_TILES", 1), dot_precision,
                                rescale_per_step)
        leftover = meta["BLOCK_N"] if kernel != "bwd_dkdv" and tiles > 1 else 0
        main = CALL_COLUMNS.value if kernel != "bwd_dkdv" and drop_bits == 1 else tiles * meta["BLOCK_N"]
        n_key = max(n_key, main + leftover)
    return max(meta["BLOCK_M"] for meta in metas.values()) + ROW_TAIL, n_key + KEY_TAIL
