"""DCAMA model: backbone features, head math against a per-layer reference, K-shot batching, impls,
training behaviour, autocast/compile and input validation. Small images so that it all runs on a CPU."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dcama.model as model_mod
from dcama import DCAMA
from dcama.backbones import BACKBONES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWIN_TEST_SIZE = 32  # smallest side Swin-B builds for (a window per stage grid); the published model uses 384


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


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return randomise_(DCAMA("resnet18", attn_impl="naive")).to(DEVICE).eval()


@pytest.fixture(scope="module")
def swin_small():
    torch.manual_seed(0)
    return DCAMA("swin_b", attn_impl="sdpa", img_size=SWIN_TEST_SIZE).to(DEVICE).eval()


def reference_logits(model, query_img, support_imgs, support_masks):
    """The spec's head written layer by layer and shot by shot, with explicit softmax attention."""
    head, spec = model.head, model.backbone.spec
    batch, shots = support_imgs.shape[:2]
    q_feats = model.backbone(query_img)
    s_feats = [model.backbone(support_imgs[:, k]) for k in range(shots)]
    bounds = [0] + spec.stack_ids
    coarse = {}
    for idx in range(bounds[1], bounds[4]):
        stage = next(s for s in (1, 2, 3) if idx < bounds[s + 1])
        attn, pe = head.DCAMA_blocks[stage - 1], head.pe[stage - 1].pe
        _, ch, h, w = q_feats[idx].shape
        d = ch // 8
        q = attn.linears[0](q_feats[idx].flatten(2).transpose(1, 2) + pe[:, : h * w])
        k = torch.cat([attn.linears[1](s[idx].flatten(2).transpose(1, 2) + pe[:, : h * w]) for s in s_feats], 1)
        v = torch.cat([F.interpolate(support_masks[:, j: j + 1], (h, w), mode="bilinear", align_corners=True)
                       .flatten(1) for j in range(shots)], 1)
        q = q.view(batch, h * w, 8, d).transpose(1, 2)
        k = k.view(batch, -1, 8, d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        coarse.setdefault(stage, []).append((p @ v[:, None, :, None]).mean(1).view(batch, 1, h, w))
    up = lambda x, size: F.interpolate(x, size, mode="bilinear", align_corners=True)  # noqa: E731
    m3, m2, m1 = (head.conv3(torch.cat(coarse[1], 1)), head.conv2(torch.cat(coarse[2], 1)),
                  head.conv1(torch.cat(coarse[3], 1)))
    mix = head.conv5(up(head.conv4(up(m1, m2.shape[-2:]) + m2), m3.shape[-2:]) + m3)
    l2, l1 = bounds[2] - 1, bounds[1] - 1
    mix = torch.cat((mix, q_feats[l2], torch.stack([s[l2] for s in s_feats]).max(0).values), 1)
    mix = up(mix, (mix.shape[-1] * 2,) * 2)
    mix = torch.cat((mix, q_feats[l1], torch.stack([s[l1] for s in s_feats]).max(0).values), 1)
    out = head.mixer1(mix)
    out = head.mixer2(up(out, (out.shape[-1] * 2,) * 2))
    return head.mixer3(up(out, (out.shape[-1] * 2,) * 2))


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 32)])
def test_resnet_features_are_pre_relu_block_outputs(name, size):
    torch.manual_seed(0)
    model = randomise_(DCAMA(name)).eval()
    plain = timm.create_model(name, pretrained=False, num_classes=0).eval()
    plain.load_state_dict(model.backbone.net.state_dict())
    img = torch.randn(2, 3, size, size)
    feats = model.backbone(img)
    spec = BACKBONES[name]
    assert len(feats) == sum(spec.depths)
    with torch.no_grad():
        x = plain.maxpool(plain.act1(plain.bn1(plain.conv1(img))))
        i = 0
        for s, stage in enumerate((plain.layer1, plain.layer2, plain.layer3, plain.layer4)):
            for block in stage:
                x = block(x)  # timm's own block, ReLU included
                side = max(size // 4 // 2 ** s, 1)
                assert feats[i].shape == (2, spec.channels[s], side, side)
                assert feats[i].min() < 0  # taken before the ReLU
                torch.testing.assert_close(torch.relu(feats[i]), x)
                i += 1


def test_swin_features_every_block(swin_small):
    net = swin_small.backbone.net
    img = torch.randn(1, 3, SWIN_TEST_SIZE, SWIN_TEST_SIZE, device=DEVICE)
    with torch.no_grad():
        feats = swin_small.backbone(img)
        last = net.layers(net.patch_embed(img))  # timm's stages, before the final norm
    side = SWIN_TEST_SIZE // 4
    expected = [(c, side >> s) for s, (c, d) in enumerate(zip((128, 256, 512, 1024), (2, 2, 18, 2)))
                for _ in range(d)]
    assert [(f.shape[1], f.shape[2]) for f in feats] == expected
    torch.testing.assert_close(feats[-1], last.permute(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_resnet_output_shapes(name):
    model = DCAMA(name, attn_impl="sdpa").to(DEVICE).eval()
    with torch.no_grad():
        for batch, shots in ((2 if name in ("resnet18", "resnet34") else 1, 1), (1, 5)):
            logits = model(*episode(batch=batch, shots=shots, size=32))
            assert logits.shape == (batch, 2, 32, 32)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shots", [1, 5])
def test_swin_output_shapes(swin_small, shots):
    with torch.no_grad():
        logits = swin_small(*episode(batch=1, shots=shots, size=SWIN_TEST_SIZE))
    assert logits.shape == (1, 2, SWIN_TEST_SIZE, SWIN_TEST_SIZE)
    assert torch.isfinite(logits).all()


def test_swin_published_config():
    with torch.device("meta"):  # structure only: no weights initialised
        model = DCAMA("swin_b", attn_impl="sdpa")
    assert model.backbone.img_size == 384
    layers = model.backbone.net.layers
    assert [len(s.blocks) for s in layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in layers] == [4, 8, 16, 32]
    assert [s.blocks[0].window_size for s in layers] == [(12, 12)] * 4
    assert [s.blocks[1].shift_size for s in layers] == [(6, 6)] * 3 + [(0, 0)]  # 12x12 grid: no shift
    assert model.head.mixer1[0].in_channels == 896
    assert [model.head.DCAMA_blocks[i].linears[0].in_features for i in range(3)] == [256, 512, 1024]


def test_head_matches_layer_by_layer_reference(r18):
    inputs = episode(batch=2, shots=2, size=64, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(r18(*inputs), reference_logits(r18, *inputs), rtol=1e-4, atol=1e-5)


def test_batch_of_episodes_equals_each_episode_alone(r18):
    query, support, masks = episode(batch=2, shots=5, size=64, seed=2)
    with torch.no_grad():
        both = r18(query, support, masks)
        for b in range(2):
            alone = r18(query[b: b + 1], support[b: b + 1], masks[b: b + 1])
            torch.testing.assert_close(both[b: b + 1], alone, rtol=1e-4, atol=1e-5)


def test_attention_impls_agree(r18):
    inputs = episode(batch=1, shots=2, size=64, seed=3)
    outs = {}
    try:
        for impl in ("naive", "sdpa", "triton"):
            r18.attn_impl = impl
            with torch.no_grad():
                outs[impl] = r18(*inputs)
    finally:
        r18.attn_impl = "naive"
    torch.testing.assert_close(outs["sdpa"], outs["naive"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["triton"], outs["naive"], rtol=1e-4, atol=1e-5)


def test_one_projection_and_one_op_call_per_stage(monkeypatch):
    model = DCAMA("resnet34", attn_impl="sdpa").to(DEVICE)
    calls, projections = [], []
    real_op = model_mod.dcama_attention

    def spy(query, key, value, **kw):
        calls.append((query.shape, value.shape, kw))
        return real_op(query, key, value, **kw)

    monkeypatch.setattr(model_mod, "dcama_attention", spy)
    for block in model.head.DCAMA_blocks:
        for lin in block.linears:
            lin.register_forward_hook(lambda mod, args, out: projections.append(mod))
    query, support, masks = episode(batch=2, shots=3, size=32)
    for training in (False, True):  # eval: no dropout; training: p=0.5 on the attention weights
        calls.clear(), projections.clear()
        model.train(training)
        model(query, support, masks)
        assert len(projections) == 6 and len(set(map(id, projections))) == 6
        depths = BACKBONES["resnet34"].depths
        assert [c[0][2] for c in calls] == [8 * depths[1], 8 * depths[2], 8 * depths[3]]  # layers x 8 heads
        assert [c[1] for c in calls] == [(2, 3 * 16), (2, 3 * 4), (2, 3 * 1)]  # one mask per episode, no copies
        assert all(c[2]["dropout_p"] == (0.5 if training else 0.0) for c in calls)
        assert all(pe.dropout.p == 0.5 and pe.dropout.training == training for pe in model.head.pe)


def test_dropout_only_in_training(r18):
    inputs = episode(batch=1, shots=1, size=32, seed=4)
    with torch.no_grad():
        assert torch.equal(r18(*inputs), r18(*inputs))
        r18.train()
        r18.attn_impl = "sdpa"
        try:
            a, b = r18(*inputs), r18(*inputs)
        finally:
            r18.eval()
            r18.attn_impl = "naive"
    assert not torch.allclose(a, b)


def test_gradients_reach_head_never_backbone():
    model = DCAMA("resnet18", attn_impl="sdpa").to(DEVICE)
    model.train()
    assert not model.backbone.training and not model.backbone.net.layer1[0].bn1.training
    assert model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    stats = model.backbone.net.bn1.running_mean.clone()
    query, support, masks = episode(batch=2, shots=2, size=64, seed=5)
    target = masks[:, 0].long()
    loss = F.cross_entropy(model(query, support, masks), target)
    loss.backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(model.backbone.net.bn1.running_mean, stats)


def test_predict_resizes_logits_before_argmax(r18):
    inputs = episode(batch=2, shots=1, size=32, seed=6)
    with torch.no_grad():
        logits = r18(*inputs)
    pred = r18.predict(*inputs)
    assert pred.dtype == torch.long and pred.shape == (2, 32, 32)
    assert torch.equal(pred, logits.argmax(1))
    resized = r18.predict(*inputs, out_size=(50, 70))
    expected = F.interpolate(logits, (50, 70), mode="bilinear", align_corners=True).argmax(1)
    assert resized.shape == (2, 50, 70) and torch.equal(resized, expected)
    assert set(resized.unique().tolist()) <= {0, 1}


def test_bf16_autocast(r18):
    inputs = episode(batch=1, shots=2, size=64, seed=7)
    with torch.no_grad():
        ref = r18(*inputs)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = r18(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = DCAMA("resnet18", attn_impl="sdpa").to(DEVICE).eval()
    inputs = episode(batch=1, shots=2, size=32, seed=8)
    eager = model(*inputs)
    torch._dynamo.reset()
    # backend="eager" checks that the whole forward traces as one graph without paying for code generation.
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out, inputs[2][:, 0].long()).backward()
    assert model.head.mixer3[2].weight.grad.abs().sum() > 0


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        DCAMA("vgg16")
    with pytest.raises(ValueError, match="attn_impl"):
        DCAMA("resnet18", attn_impl="flash")
    with pytest.raises(ValueError, match="multiple of 32"):
        DCAMA("swin_b", img_size=100)
    with pytest.raises(ValueError, match="window"):
        DCAMA("swin_b", img_size=160)
    with pytest.raises(ValueError, match="multiple of 32"):
        DCAMA("resnet18", img_size=40)


def test_config_rebuilds_model(r18):
    assert r18.config == {"backbone": "resnet18", "attn_impl": "naive", "backbone_weights": None, "img_size": None}
    assert DCAMA(**r18.config).config == r18.config


def _bad_inputs():
    q, s, m = episode(batch=2, shots=2, size=64)
    return {
        "mask size": ((q, s, m[..., :32, :32]), "support masks"),
        "K mismatch": ((q, s, m[:, :1]), "2 support images but 1 support masks"),
        "batch mismatch": ((q[:1], s, m), "batch sizes differ"),
        "support rank": ((q, s[:, 0], m), "support_imgs must be"),
        "mask rank": ((q, s, m[:, 0]), "support_masks must be"),
        "query rank": ((q[0], s, m), "query_img must be"),
        "channels": ((q[:, :1], s, m), "query_img must be"),
        "support size": ((q, s[..., :32, :32], m), "support images are"),
        "non-square": ((q[..., :32], s[..., :32], m[..., :32]), "square"),
        "too small": ((q[..., :16, :16], s[..., :16, :16], m[..., :16, :16]), "multiple of 32"),
        "not a multiple of 32": ((q[..., :48, :48], s[..., :48, :48], m[..., :48, :48]), "multiple of 32"),
        "no shots": ((q, s[:, :0], m[:, :0]), "K >= 1"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_input_errors(r18, case):
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        r18(*args)


def test_swin_rejects_other_sizes(swin_small):
    q, s, m = episode(batch=1, shots=1, size=64)
    with pytest.raises(ValueError, match=f"built for {SWIN_TEST_SIZE}x{SWIN_TEST_SIZE}"):
        swin_small(q, s, m)
